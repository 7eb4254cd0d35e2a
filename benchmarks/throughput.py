"""Training throughput of `dgm train` against a hand-written plain-JAX reference, in one run.

The reference is the same VAE (784-400-20, ReLU, batch 128, Adam at 1e-3) written directly in
JAX: hand-rolled parameters and Adam, one whole epoch as one jitted `lax.scan` over
device-resident data. Both are timed the same way (wall clock per epoch, median over the epochs
after the first, which compiles) and the script prints the ratio dgm / reference.

    TFDS_DATA_DIR=../shared/tensorflow_datasets python benchmarks/throughput.py --epochs 10
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

DGM_OVERRIDES = [
    "model=vae", "model.hidden=[400]", "model.latent_dim=20", "model.activation=relu",
    "trainer.batch_size=128", "optimizer=adam", "optimizer.lr=1e-3", "dataset=binarized_mnist",
]
BATCH, HIDDEN, LATENT, LR = 128, 400, 20, 1e-3


def load_train_images() -> np.ndarray:
    import tensorflow_datasets as tfds

    source = tfds.data_source("binarized_mnist", split="train")
    return np.stack([record["image"] for record in source]).reshape(len(source), -1)  # [N, 784]


def reference_examples_per_sec(train: np.ndarray, epochs: int) -> float:
    def dense(key, n_in, n_out):
        return {"w": jax.random.normal(key, (n_in, n_out)) * jnp.sqrt(1.0 / n_in), "b": jnp.zeros(n_out)}

    keys = jax.random.split(jax.random.key(0), 4)
    params = {
        "enc1": dense(keys[0], 784, HIDDEN), "enc2": dense(keys[1], HIDDEN, 2 * LATENT),
        "dec1": dense(keys[2], LATENT, HIDDEN), "dec2": dense(keys[3], HIDDEN, 784),
    }

    def loss_fn(params, x, key):
        h = jax.nn.relu(x @ params["enc1"]["w"] + params["enc1"]["b"])
        mean, log_var = jnp.split(h @ params["enc2"]["w"] + params["enc2"]["b"], 2, axis=-1)
        z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(key, mean.shape)
        h = jax.nn.relu(z @ params["dec1"]["w"] + params["dec1"]["b"])
        logits = h @ params["dec2"]["w"] + params["dec2"]["b"]
        softplus = jnp.maximum(logits, 0) + jnp.log1p(jnp.exp(-jnp.abs(logits)))  # as dgm's
        recon = -jnp.sum(x * logits - softplus, axis=-1)
        kl = 0.5 * jnp.sum(mean**2 + jnp.exp(log_var) - log_var - 1.0, axis=-1)
        return jnp.mean(recon + kl)

    def adam(params, grads, m, v, t, b1=0.9, b2=0.999, eps=1e-8):
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
        scale = LR * jnp.sqrt(1 - b2**t) / (1 - b1**t)
        return jax.tree.map(lambda p, m, v: p - scale * m / (jnp.sqrt(v) + eps), params, m, v), m, v

    @jax.jit
    def epoch(carry, data, key):
        steps = data.shape[0] // BATCH
        order = jax.random.permutation(key, data.shape[0])[: steps * BATCH].reshape(steps, BATCH)

        def step(carry, inputs):
            params, m, v, t = carry
            indices, key = inputs
            loss, grads = jax.value_and_grad(loss_fn)(params, data[indices].astype(jnp.float32), key)
            params, m, v = adam(params, grads, m, v, t + 1)
            return (params, m, v, t + 1), loss

        return jax.lax.scan(step, carry, (order, jax.random.split(key, steps)))

    zeros = jax.tree.map(jnp.zeros_like, params)
    carry, data, rates = (params, zeros, zeros, 0), jax.device_put(train), []
    for e in range(epochs):
        started = time.perf_counter()
        carry, losses = epoch(carry, data, jax.random.key(e))
        losses = jax.device_get(losses)
        rates.append((len(train) // BATCH) * BATCH / (time.perf_counter() - started))
    assert np.isfinite(losses).all()
    return statistics.median(rates[1:])


def dgm_examples_per_sec(epochs: int, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        command = ["dgm", "train", *DGM_OVERRIDES, f"trainer.epochs={epochs}",
                   "eval.num_samples=1", "trainer.progress=false", f"hydra.run.dir={run_dir}", *extra]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return json.loads((Path(run_dir) / "summary.json").read_text())["train_examples_per_sec"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("overrides", nargs="*", help="extra overrides for dgm train")
    args = parser.parse_args()
    train = load_train_images()
    # The reference runs before and after dgm, so that drift in the machine's speed hits both.
    before = reference_examples_per_sec(train, args.epochs)
    dgm = dgm_examples_per_sec(args.epochs, args.overrides)
    after = reference_examples_per_sec(train, args.epochs)
    reference = (before + after) / 2
    print(f"device: {jax.devices()[0].platform}, epochs: {args.epochs}, batch {BATCH}")
    print(f"plain-JAX reference: {reference:10,.0f} examples/s (before {before:,.0f}, after {after:,.0f})")
    print(f"dgm train:           {dgm:10,.0f} examples/s")
    print(f"ratio dgm/reference: {dgm / reference:.3f}")


if __name__ == "__main__":
    sys.exit(main())

"""Throughput benchmarks of `dgm train`, each side of a comparison measured in the same run.

vae:        the VAE (784-400-20, ReLU, batch 128, Adam at 1e-3) against the same model written
            directly in JAX: hand-rolled parameters and Adam, one whole epoch as one jitted
            `lax.scan` over device-resident data. Prints the ratio dgm / reference.
wakesleep:  an epoch of classic wake-sleep (one layer of 200 binary units) against an epoch of the
            VAE with the same hidden sizes (one hidden layer of 200). Prints the cost ratio.
loglinear:  one full-batch EM iteration of the K = 500 Bernoulli mixture (pixel features, exact
            M-step) against the same iteration in vectorised NumPy as one writes it by hand, and
            against the same maths hand-written in JAX.

Every figure is wall clock per epoch, the median over the epochs after the first (which
compiles); the baseline of each comparison is timed before and after the other, and averaged.

    TFDS_DATA_DIR=../shared/tensorflow_datasets python benchmarks/throughput.py --epochs 20

With `--npz FILE` (arrays train, validation, test, as ../shared/data/binarized_mnist.npz) both
sides read that file instead of TFDS, for a machine that has no prepared TFDS data set.
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

COMMON = ["optimizer=adam", "optimizer.lr=1e-3", "dataset=binarized_mnist"]
VAE = ["model=vae", "model.hidden=[400]", "model.latent_dim=20", "model.activation=relu", "trainer.batch_size=128"]
VAE_200 = ["model=vae", "model.hidden=[200]", "trainer.batch_size=128"]
WAKESLEEP_200 = ["model=wakesleep", "model.layers=[200]", "trainer.batch_size=128"]
LOGLINEAR_K = 500
LOGLINEAR = ["model=loglinear", f"model.num_components={LOGLINEAR_K}", "model.features=pixel", "model.m_step=exact"]
BATCH, HIDDEN, LATENT, LR = 128, 400, 20, 1e-3
NPZ = None  # --npz: the data from this file, not TFDS


def load_train_images() -> np.ndarray:
    if NPZ:
        with np.load(NPZ) as file:
            return file["train"]
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


def dgm_examples_per_sec(overrides: list[str], epochs: int) -> float:
    """`dgm train` with these overrides, as a user runs it; its median epoch after the first."""
    with tempfile.TemporaryDirectory() as run_dir:
        command = [sys.executable, "-m", "dgm_cli", "train", *COMMON, *overrides, f"trainer.epochs={epochs}",
                   "eval.num_samples=1", "trainer.progress=false", f"hydra.run.dir={run_dir}"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return json.loads((Path(run_dir) / "summary.json").read_text())["train_examples_per_sec"]


def bracketed(baseline, candidate):
    """Time the baseline before and after the candidate, so that drift in the machine's speed
    hits both. -> (baseline mean, candidate, a note of the baseline's two figures)."""
    before = baseline()
    value = candidate()
    after = baseline()
    digits = 0 if before > 100 else 3
    return (before + after) / 2, value, f"(before {before:,.{digits}f}, after {after:,.{digits}f})"


def vae_against_plain_jax(epochs: int) -> None:
    train = load_train_images()
    reference, dgm, spread = bracketed(lambda: reference_examples_per_sec(train, epochs),
                                       lambda: dgm_examples_per_sec(VAE, epochs))
    print(f"VAE 784-{HIDDEN}-{LATENT}, batch {BATCH}, examples/s:")
    print(f"  plain-JAX reference   {reference:10,.0f}  {spread}")
    print(f"  dgm train             {dgm:10,.0f}")
    print(f"  ratio dgm/reference   {dgm / reference:10.3f}")


def wakesleep_against_vae(epochs: int) -> None:
    vae, wakesleep, spread = bracketed(lambda: dgm_examples_per_sec(VAE_200, epochs),
                                       lambda: dgm_examples_per_sec(WAKESLEEP_200, epochs))
    print(f"Wake-sleep against the VAE with the same hidden sizes, batch {BATCH}, examples/s:")
    print(f"  VAE, model.hidden=[200]          {vae:10,.0f}  {spread}")
    print(f"  wake-sleep, model.layers=[200]   {wakesleep:10,.0f}")
    print(f"  epoch cost wake-sleep/VAE        {vae / wakesleep:10.3f}")


def numpy_em_seconds(train: np.ndarray, iterations: int, dtype, alpha: float = 1e-3) -> float:
    """One iteration of EM for a mixture of K multivariate Bernoullis, vectorised NumPy as one
    writes it by hand: log p(x|z) = x log μ_zᵀ + (1 − x) log(1 − μ_z)ᵀ. The median iteration."""
    rng = np.random.default_rng(0)
    x = train.astype(dtype)  # [N, D]
    means = rng.uniform(0.25, 0.75, (LOGLINEAR_K, x.shape[1])).astype(dtype)  # [K, D]
    weights = np.full(LOGLINEAR_K, 1 / LOGLINEAR_K, dtype)
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        log_joint = x @ np.log(means).T + (1 - x) @ np.log1p(-means).T + np.log(weights)  # [N, K]
        log_p = np.logaddexp.reduce(log_joint, axis=1, keepdims=True)
        responsibilities = np.exp(log_joint - log_p)
        counts = responsibilities.sum(0)
        means = (responsibilities.T @ x + alpha) / (counts[:, None] + 2 * alpha)
        weights = (counts + alpha) / (len(x) + LOGLINEAR_K * alpha)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def jax_em_seconds(train: np.ndarray, iterations: int, alpha: float = 1e-3) -> float:
    """One iteration of the same EM as dgm's (natural parameters w = logit μ, log p(x|z) = x wᵀ −
    Σ_d softplus(w_zd), the exact M-step), hand-written in JAX as one jitted function on the
    device-resident binary images as float32. The median iteration."""
    x = jnp.asarray(train, jnp.float32)  # [N, D]
    means = jax.random.uniform(jax.random.key(0), (LOGLINEAR_K, x.shape[1]), minval=0.25, maxval=0.75)
    weights, log_prior = jnp.log(means) - jnp.log1p(-means), jnp.full(LOGLINEAR_K, -np.log(LOGLINEAR_K))

    @jax.jit
    def iteration(weights, log_prior):
        log_joint = log_prior + x @ weights.T - jnp.sum(jax.nn.softplus(weights), -1)  # [N, K]
        log_p = jax.nn.logsumexp(log_joint, axis=-1, keepdims=True)
        responsibilities = jnp.exp(log_joint - log_p)
        sums, counts = responsibilities.T @ x, jnp.sum(responsibilities, 0)  # [K, D], [K]
        weights = jnp.log(sums + alpha) - jnp.log(counts[:, None] - sums + alpha)
        return weights, jnp.log(counts + alpha), -jnp.mean(log_p)

    jax.block_until_ready(iteration(weights, log_prior))  # compiles
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        weights, log_prior, loss = jax.block_until_ready(iteration(weights, log_prior))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def loglinear_against_numpy(epochs: int) -> None:
    train = load_train_images()
    iterations = max(3, epochs // 2)
    numpy_seconds, rate, spread = bracketed(lambda: numpy_em_seconds(train, iterations, np.float64),
                                            lambda: dgm_examples_per_sec(LOGLINEAR, epochs))
    single = numpy_em_seconds(train, iterations, np.float32)
    jax_seconds, _, jax_spread = bracketed(lambda: jax_em_seconds(train, max(3, epochs)), lambda: None)
    dgm_seconds = len(train) / rate
    print(f"One full-batch EM iteration, K = {LOGLINEAR_K} pixel features, {len(train)} images, seconds:")
    print(f"  NumPy EM, float64 (NumPy's default)  {numpy_seconds:8.3f}  {spread}")
    print(f"  NumPy EM, float32                    {single:8.3f}")
    print(f"  plain-JAX EM, float32                {jax_seconds:8.3f}  {jax_spread}")
    print(f"  dgm train model=loglinear            {dgm_seconds:8.3f}")
    print(f"  ratio dgm/NumPy (float64)            {dgm_seconds / numpy_seconds:8.3f}")
    print(f"  ratio dgm/plain JAX                  {dgm_seconds / jax_seconds:8.3f}")


BENCHMARKS = {"vae": vae_against_plain_jax, "wakesleep": wakesleep_against_vae, "loglinear": loglinear_against_numpy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated: " + ", ".join(BENCHMARKS))
    parser.add_argument("--npz", help="read binarized MNIST from this .npz instead of TFDS")
    args = parser.parse_args()
    if args.npz:
        global NPZ
        NPZ = str(Path(args.npz).absolute())
        COMMON[COMMON.index("dataset=binarized_mnist"):] = ["dataset=numpy", f"dataset.path={NPZ}"]
    print(f"device: {jax.devices()[0].platform}, epochs per measurement: {args.epochs}")
    for name in args.only.split(","):
        BENCHMARKS[name](args.epochs)


if __name__ == "__main__":
    sys.exit(main())

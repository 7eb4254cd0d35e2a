"""The test pass of `dgm` (the importance-sampled log-likelihood of every test image) against
the same computation written directly in JAX as one jitted function over the whole test set.

Both evaluate the VAE 784-400-20 (ReLU) with the same parameters on the 10 000 test images of
binarized MNIST, k importance samples per image, at most `sample_batch` (image, sample) pairs
at once. dgm's side is `steps.log_likelihoods`, which splits the work into a few jitted calls
(to report progress between them, and to split each batch over the devices of a data-parallel
run); the reference is one `lax.map` over batches. Prints both times and their ratio, each the
median of `--repeats` runs after a first one that compiles, and checks that both give the same
mean log-likelihood.

    TFDS_DATA_DIR=../shared/tensorflow_datasets python benchmarks/test_likelihood.py --num-samples 1000

`--npz FILE` reads the data from that file (as ../shared/data/binarized_mnist.npz) instead of TFDS.
"""

import argparse
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from hydra import compose, initialize_config_module

from dgm_cli import data as data_lib
from dgm_cli import runtime, steps
from dgm_cli.loop import Settings, build_model


def reference_log_likelihood(num_samples: int, sample_batch: int):
    """Plain JAX: (layers, x [N, D] uint8, key) -> [N] log (1/k) Σ_i p(x, z_i) / q(z_i | x), the
    layers ([(kernel, bias)] of the encoder and of the decoder) an argument, as dgm's state is:
    weights closed over would be constants, which XLA may lay out ahead for its matmuls."""
    chunk = min(sample_batch, num_samples)
    batch = max(1, sample_batch // chunk)
    chunks = -(-num_samples // chunk)

    def mlp(params, h):
        for kernel, bias in params[:-1]:
            h = jax.nn.relu(h @ kernel + bias)
        kernel, bias = params[-1]
        return h @ kernel + bias

    def log_sum_weights(encoder, decoder, x, key, size):  # x [B, D] -> [B] log Σ_i w_i over `size` samples
        mean, log_var = jnp.split(mlp(encoder, x), 2, axis=-1)
        eps = jax.random.normal(key, (size, *mean.shape))
        z = mean + jnp.exp(0.5 * log_var) * eps
        logits = mlp(decoder, z)
        log_px_z = jnp.sum(x * logits - (jnp.maximum(logits, 0) + jnp.log1p(jnp.exp(-jnp.abs(logits)))), -1)
        log_pz = -0.5 * jnp.sum(math.log(2 * math.pi) + z**2, -1)
        log_qz = -0.5 * jnp.sum(math.log(2 * math.pi) + log_var + (z - mean) ** 2 * jnp.exp(-log_var), -1)
        return jax.nn.logsumexp(log_px_z + log_pz - log_qz, axis=0)

    @jax.jit
    def log_likelihood(layers, x, key):
        encoder, decoder = layers
        size = x.shape[0]
        padded = -(-size // batch) * batch
        x = jnp.pad(x, [(0, padded - size), (0, 0)]).astype(jnp.float32).reshape(-1, batch, x.shape[1])

        def one_batch(args):
            x, key = args
            total = jnp.full(x.shape[0], -jnp.inf)
            for index in range(chunks):  # a handful of chunks: unrolled
                size = min(chunk, num_samples - index * chunk)
                total = jnp.logaddexp(total, log_sum_weights(encoder, decoder, x, jax.random.fold_in(key, index),
                                                             size))
            return total - math.log(num_samples)

        return jax.lax.map(one_batch, (x, jax.random.split(key, x.shape[0]))).reshape(-1)[:size]

    return log_likelihood


def layer_arrays(mlp):
    return [(np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])) for layer in mlp.layers]


def timed(function, repeats: int) -> tuple[float, np.ndarray]:
    function()  # compiles
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--sample-batch", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--npz", help="read binarized MNIST from this .npz instead of TFDS")
    args = parser.parse_args()
    data_source = ["dataset=numpy", f"dataset.path={args.npz}"] if args.npz else []

    with initialize_config_module("dgm_cli.configs", version_base="1.3"):
        cfg = compose("train", overrides=["model=vae", "model.hidden=[400]", "model.latent_dim=20",
                                          "model.activation=relu", "cache_dir=null",
                                          *data_source])
    runtime.configure(cfg)
    data = data_lib.load(cfg.dataset)
    model = build_model(cfg, data.spec, Settings.from_config(cfg))
    state = jax.jit(model.init)(jax.random.key(0))
    devices = runtime.Devices(data_parallel=False)
    key = jax.random.key(1)

    dgm_seconds, dgm_values = timed(lambda: steps.log_likelihoods(
        model, state, data.test, key, args.num_samples, args.sample_batch, devices, progress=False)["log_p"],
        args.repeats)
    reference = reference_log_likelihood(args.num_samples, args.sample_batch)
    layers = jax.device_put((layer_arrays(state.nets.encoder), layer_arrays(state.nets.decoder)))
    test_images = jnp.asarray(data.test)
    reference_seconds, reference_values = timed(lambda: np.asarray(reference(layers, test_images, key)), args.repeats)
    print(json.dumps({
        "device": jax.devices()[0].device_kind, "num_samples": args.num_samples, "test_images": len(data.test),
        "reference_seconds": round(reference_seconds, 3), "dgm_seconds": round(dgm_seconds, 3),
        "ratio": round(dgm_seconds / reference_seconds, 3),
        "mean_log_likelihood": {"reference": float(np.mean(reference_values)), "dgm": float(np.mean(dgm_values))},
    }, indent=2))


if __name__ == "__main__":
    main()

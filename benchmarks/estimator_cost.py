"""Seconds per training step of every estimator of `model=sbn` (and of wake-sleep and RWS), relative to `reinforce` on the same
net: the README comparison tables' cost column. Each method is composed on the preset exactly as
`dgm train experiment=E method=M` composes it (so with the preset's K, temperature and baseline
nets), and timed as the jitted training step that the epoch scans: 20 steps in one `lax.scan`, the
median of 5 timings after a compiling one, on one batch of binarized-MNIST-sized binary images
(the step's cost does not depend on the pixel values). Every method is timed in one process, one
after another, so that the ratios share the machine's load.

    python benchmarks/estimator_cost.py sbn_mnist
    python benchmarks/estimator_cost.py sbn_nonlinear_mnist
    python benchmarks/estimator_cost.py categorical_mnist
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from hydra import compose, initialize_config_module

from dgm_cli import estimators, models, optim
from dgm_cli.data import Spec

STEPS, REPEATS = 20, 5


def step_seconds(experiment: str, method: str, batch_size: int) -> float:
    with initialize_config_module("dgm_cli.configs", version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", f"method={method}"])
    spec = Spec(num_train=batch_size * STEPS, image_shape=(28, 28), num_classes=None)
    make_optimizer = optim.optimizer_factory(cfg.optimizer, cfg.schedule, cfg.trainer.epochs, STEPS)
    model = models.build(cfg.model, spec, make_optimizer)
    x = (jax.random.uniform(jax.random.key(0), (batch_size, 784)) < 0.15).astype(jnp.float32)

    @jax.jit
    def steps(state, key):
        def step(state, key):
            state, metrics = model.train_step(state, {"x": x}, key)
            return state, metrics["loss"]

        return jax.lax.scan(step, state, jax.random.split(key, STEPS))

    state, _ = steps(model.init(jax.random.key(1)), jax.random.key(2))
    jax.block_until_ready(state)
    times = []
    for repeat in range(REPEATS):
        started = time.perf_counter()
        state, losses = steps(state, jax.random.key(3 + repeat))
        jax.block_until_ready(losses)
        times.append((time.perf_counter() - started) / STEPS)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", help="a preset of configs/experiment/ with model=sbn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--methods", default="", help="comma-separated; default: every estimator that applies")
    args = parser.parse_args()
    with initialize_config_module("dgm_cli.configs", version_base="1.3"):
        categorical = compose("train", overrides=[f"experiment={args.experiment}"]).model.get("units") == "categorical"
    methods = args.methods.split(",") if args.methods else [
        name for name, estimator in estimators.ESTIMATORS.items() if estimator.categorical or not categorical
    ] + ([] if categorical else ["rws", "wakesleep"])  # the Helmholtz machine's methods, binary units only
    methods = ["reinforce", *(m for m in methods if m != "reinforce")]
    seconds = {method: step_seconds(args.experiment, method, args.batch_size) for method in methods}
    print(f"{args.experiment}, batch {args.batch_size}, {jax.default_backend()}: seconds a training step")
    for method, value in seconds.items():
        print(f"{method:17s} {1000 * value:8.2f} ms  {value / seconds['reinforce']:5.2f}x reinforce")


if __name__ == "__main__":
    main()

"""The training loop: init -> epochs (one jitted scan each) -> evaluation -> checkpoints -> metrics.

It knows a model only through the contract of `dgm_cli.models`. The data sets live on the device
as uint8 from the start; one epoch is one jitted call that permutes the examples on the device
and scans over the batches, so nothing returns to the host between steps.
"""

import dataclasses
import logging
import math
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dgm_cli import data as data_lib
from dgm_cli import models, optim, pictures
from dgm_cli.checkpoints import Checkpoints
from dgm_cli.errors import DgmError, positive_int
from dgm_cli.metrics import MetricsLog, write_json_atomically

log = logging.getLogger(__name__)


def _float_pixels(batch: dict) -> dict:
    return {**batch, "x": batch["x"].astype(jnp.float32)}


def make_train_epoch(model, batch_size: int):
    """(state, data {"x": [N, D] uint8, "labels"?: [N]}, key) -> (state, metrics, each [steps]):
    one jitted epoch."""

    @jax.jit
    def train_epoch(state, data, key):
        size = data["x"].shape[0]
        steps = size // batch_size  # the remainder sits out this epoch, not the next
        order_key, step_key = jax.random.split(key)
        order = jax.random.permutation(order_key, size)[: steps * batch_size]

        def step(state, inputs):
            indices, key = inputs
            batch = jax.tree.map(lambda array: array[indices], data)
            return model.train_step(state, _float_pixels(batch), key)

        inputs = (order.reshape(steps, batch_size), jax.random.split(step_key, steps))
        return jax.lax.scan(step, state, inputs)

    return train_epoch


def _batched(array, batch_size: int):
    """[N, ...] -> [ceil(N / B), B, ...], the last batch padded with zeros (dropped later)."""
    batches = -(-array.shape[0] // batch_size)
    padding = [(0, batches * batch_size - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
    return jnp.pad(array, padding).reshape(batches, batch_size, *array.shape[1:])


def make_evaluate(model, batch_size: int):
    """(state, data {"x": [N, D], …}, key) -> {metric: mean over the N examples of `model.evaluate`}."""

    @jax.jit
    def evaluate(state, data, key):
        batches = jax.tree.map(lambda array: _batched(array, batch_size), data)
        keys = jax.random.split(key, batches["x"].shape[0])
        per_example = jax.lax.map(lambda args: model.evaluate(state, _float_pixels(args[0]), args[1]), (batches, keys))
        size = data["x"].shape[0]
        return {name: jnp.mean(values.reshape(-1)[:size]) for name, values in per_example.items()}

    return evaluate


def make_log_likelihood(model, num_samples: int, sample_batch: int):
    """(state, x [B, D], key) -> [B] importance-sampled log p(x) with `num_samples` samples
    each, and the B to call it with: at most `sample_batch` (example, sample) pairs are
    evaluated at once, so memory stays bounded however many samples are asked for."""
    if model.exact_likelihood:
        exact = lambda state, x, key: model.log_likelihood(state, x.astype(jnp.float32), key, 0)
        return jax.jit(exact), sample_batch
    chunk = min(sample_batch, num_samples)
    full_chunks, rest = divmod(num_samples, chunk)

    @jax.jit
    def log_likelihood(state, x, key):
        x = x.astype(jnp.float32)
        keys = jax.random.split(key, full_chunks + 1)

        # Running log Σ_i w_i: a chunk's log-mean-exp plus log(its size) is its log-sum-exp.
        def add_chunk(log_sum, key, size=chunk):
            return jnp.logaddexp(log_sum, model.log_likelihood(state, x, key, size) + math.log(size))

        log_sum = jnp.full(x.shape[0], -jnp.inf)
        log_sum, _ = jax.lax.scan(lambda acc, key: (add_chunk(acc, key), None), log_sum, keys[:-1])
        if rest:
            log_sum = add_chunk(log_sum, keys[-1], rest)
        return log_sum - math.log(num_samples)

    return log_likelihood, max(1, sample_batch // chunk)


def test_log_likelihood(log_likelihood, batch_size: int, state, data, key, progress: bool):
    """[N] log p(x) of every test example, one jitted call per batch, behind a progress bar."""
    batches = _batched(data, batch_size)
    keys = jax.random.split(key, len(batches))
    results = []
    for batch, batch_key in tqdm(
        zip(batches, keys), total=len(batches), desc="test log-likelihood", leave=False,
        disable=None if progress else True,
    ):
        results.append(np.asarray(log_likelihood(state, batch, batch_key)))
    return np.concatenate(results)[: data.shape[0]]


def _check_finite(losses, epoch: int, steps_per_epoch: int, checkpoints: Checkpoints) -> None:
    """Stop at a NaN or infinite loss, naming its epoch and step and the checkpoint kept."""
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        step = (epoch - 1) * steps_per_epoch + int(bad[0]) + 1
        last = checkpoints.latest_epoch()
        kept = f"the last good checkpoint (epoch {last}) is in" if last else "no checkpoint was saved in"
        raise DgmError(
            f"training diverged: the loss became {losses[bad[0]]} at epoch {epoch}, step {step}; "
            f"{kept} {checkpoints.directory} (try a lower optimizer.lr)"
        )


@dataclasses.dataclass(frozen=True)
class Settings:
    """The trainer and eval settings of a config, checked."""

    epochs: int
    batch_size: int | None  # None: the whole training set in one batch
    progress: bool
    num_pictures: int
    num_samples: int
    eval_batch_size: int
    sample_batch: int

    @classmethod
    def from_config(cls, cfg) -> "Settings":
        return cls(
            epochs=positive_int(cfg.trainer.epochs, "trainer.epochs"),
            batch_size=None if cfg.trainer.batch_size is None else positive_int(cfg.trainer.batch_size, "trainer.batch_size"),
            progress=bool(cfg.trainer.progress),
            num_pictures=positive_int(cfg.trainer.num_pictures, "trainer.num_pictures"),
            num_samples=positive_int(cfg.eval.num_samples, "eval.num_samples"),
            eval_batch_size=positive_int(cfg.eval.batch_size, "eval.batch_size"),
            sample_batch=positive_int(cfg.eval.sample_batch, "eval.sample_batch"),
        )


@dataclasses.dataclass
class History:
    best_epoch: int | None = None
    best_value: float = math.inf
    examples_per_sec: list[float] = dataclasses.field(default_factory=list)


def train_epochs(model, state, splits, keys, settings, checkpoints, metrics_log):
    """Every epoch: train (one jitted scan), validate, checkpoint, log. -> (state, History)."""
    train_data, validation_data = splits["train"], splits["validation"]
    steps_per_epoch = train_data["x"].shape[0] // settings.batch_size
    train_epoch = make_train_epoch(model, settings.batch_size)
    evaluate = make_evaluate(model, settings.eval_batch_size)
    history = History()
    bar = tqdm(range(1, settings.epochs + 1), desc="epochs", disable=None if settings.progress else True)
    for epoch in bar:
        started = time.perf_counter()
        state, step_metrics = train_epoch(state, train_data, jax.random.fold_in(keys.train, epoch))
        step_metrics = jax.device_get(step_metrics)  # the epoch's one host transfer
        seconds = time.perf_counter() - started
        _check_finite(step_metrics["loss"], epoch, steps_per_epoch, checkpoints)
        rate = steps_per_epoch * settings.batch_size / seconds
        history.examples_per_sec.append(rate)
        step = epoch * steps_per_epoch
        train = {name: float(np.mean(values)) for name, values in step_metrics.items()}
        metrics_log.write("train", epoch, step, {**train, "examples_per_sec": rate, "seconds": seconds})
        validation = evaluate(state, validation_data, jax.random.fold_in(keys.validation, epoch))
        validation = {name: float(value) for name, value in validation.items()}
        metrics_log.write("validation", epoch, step, validation)

        value = validation[model.selection_metric]
        checkpoints.save(epoch, state, value)
        if value < history.best_value:
            history.best_epoch, history.best_value = epoch, value
        bar.set_postfix(loss=f"{train['loss']:.2f}", validation=f"{value:.2f}", best=history.best_epoch)
        log.info("epoch %d/%d: train loss %.3f, validation %s %.3f, %.0f examples/s",
                 epoch, settings.epochs, train["loss"], model.selection_metric, value, rate)
    if history.best_epoch is None:
        raise DgmError(f"validation {model.selection_metric} was never finite; nothing to evaluate")
    return state, history


def evaluate_test(model, state, test_data, key, settings) -> dict[str, float]:
    """Test log-likelihood (importance sampled unless exact) and the other test metrics."""
    log_likelihood, examples_per_call = make_log_likelihood(model, settings.num_samples, settings.sample_batch)
    log_p = test_log_likelihood(log_likelihood, examples_per_call, state, test_data["x"], key, settings.progress)
    others = make_evaluate(model, settings.eval_batch_size)(state, test_data, key)
    return {"nll": -float(np.mean(log_p)), **{name: float(value) for name, value in others.items()}}


def save_pictures(model, state, test_images, image_shape, key, count: int, run_dir: Path) -> None:
    samples_key, reconstruction_key = jax.random.split(key)
    samples = model.sample(state, samples_key, count)
    pictures.save_grid(run_dir / "samples" / "samples.png", samples, image_shape)
    originals = test_images[: count // 2]
    reconstructions = model.reconstruct(state, jnp.asarray(originals, jnp.float32), reconstruction_key)
    pictures.save_pairs(run_dir / "samples" / "reconstructions.png", originals, reconstructions, image_shape)
    for name, images in model.extra_pictures(state).items():
        pictures.save_grid(run_dir / "samples" / f"{name}.png", images[:count], image_shape)


class Keys(NamedTuple):
    init: jax.Array
    train: jax.Array
    validation: jax.Array
    test: jax.Array
    pictures: jax.Array


def run(cfg, run_dir: Path) -> dict:
    """Train `cfg.model` on `cfg.dataset`, evaluate the best epoch on the test set, and write
    metrics, checkpoints, pictures and, last, `summary.json` into `run_dir`."""
    started = time.perf_counter()
    # JAX's default, sharding-friendly threefry takes twice as long per random word on a CPU
    # (measured); wake-sleep draws a word for every binary unit it samples.
    jax.config.update("jax_threefry_partitionable", jax.default_backend() != "cpu")
    settings = Settings.from_config(cfg)
    data = data_lib.load(cfg.dataset)
    if settings.batch_size is None:
        settings = dataclasses.replace(settings, batch_size=len(data.train))
    if settings.batch_size > len(data.train):
        raise DgmError(f"trainer.batch_size {settings.batch_size} exceeds the {len(data.train)} training examples")
    steps_per_epoch = len(data.train) // settings.batch_size
    make_optimizer = optim.optimizer_factory(cfg.optimizer, cfg.schedule, settings.epochs, steps_per_epoch)
    model = models.build(cfg.model, data.spec, make_optimizer)
    log.info("%s on %s: %d train / %d validation / %d test examples of %d pixels, %d steps per epoch",
             cfg.model.name, cfg.dataset.name, len(data.train), len(data.validation), len(data.test),
             data.dim, steps_per_epoch)

    run_dir.mkdir(parents=True, exist_ok=True)
    keys = Keys(*jax.random.split(jax.random.key(cfg.seed), len(Keys._fields)))
    state = model.init(keys.init)
    splits = jax.device_put(data.batches())
    with MetricsLog(run_dir) as metrics_log, Checkpoints(run_dir / "checkpoints") as checkpoints, \
            logging_redirect_tqdm():
        state, history = train_epochs(model, state, splits, keys, settings, checkpoints, metrics_log)
        state = checkpoints.restore(history.best_epoch, like=state)
        how = "exactly" if model.exact_likelihood else f"with {settings.num_samples} importance samples per example"
        log.info("testing epoch %d %s", history.best_epoch, how)
        test = evaluate_test(model, state, splits["test"], keys.test, settings)
        metrics_log.write("test", history.best_epoch, history.best_epoch * steps_per_epoch, test)
    save_pictures(model, state, data.test, data.image_shape, keys.pictures, settings.num_pictures, run_dir)

    summary = {
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "test_nll": test["nll"],
        "test_nll_samples": 0 if model.exact_likelihood else settings.num_samples,
        "test_neg_elbo": test["neg_elbo"],
        "best_epoch": history.best_epoch,
        f"best_validation_{model.selection_metric}": history.best_value,
        "epochs": settings.epochs,
        "train_examples_per_sec": statistics.median(history.examples_per_sec[1:] or history.examples_per_sec),
        "wall_seconds": time.perf_counter() - started,
    }
    if data.true_test_nll is not None:
        summary["true_test_nll"] = data.true_test_nll
    write_json_atomically(run_dir / "summary.json", summary)
    log.info("test NLL %.2f nats, test neg-ELBO %.2f, best epoch %d; run directory %s",
             test["nll"], test["neg_elbo"], history.best_epoch, run_dir)
    return summary

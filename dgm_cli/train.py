"""The training loop: init -> epochs (one jitted scan each) -> evaluation -> checkpoints -> metrics.

It knows a model only through the contract of `dgm_cli.models`. The data sets live on the device
as uint8 from the start; one epoch is one jitted call that permutes the examples on the device
and scans over the batches, so nothing returns to the host between steps.
"""

import logging
import math
import statistics
import time
from functools import partial
from pathlib import Path

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


def make_train_epoch(model, batch_size: int):
    """(state, data [N, D] uint8, key) -> (state, metrics [steps] each): one jitted epoch."""

    @jax.jit
    def train_epoch(state, data, key):
        steps = data.shape[0] // batch_size  # the remainder sits out this epoch, not the next
        order_key, step_key = jax.random.split(key)
        order = jax.random.permutation(order_key, data.shape[0])[: steps * batch_size]

        def step(state, inputs):
            indices, key = inputs
            return model.train_step(state, data[indices].astype(jnp.float32), key)

        inputs = (order.reshape(steps, batch_size), jax.random.split(step_key, steps))
        return jax.lax.scan(step, state, inputs)

    return train_epoch


def _batched(data, batch_size: int):
    """[N, D] -> [ceil(N / B), B, D], the last batch padded with zeros (dropped later)."""
    batches = -(-data.shape[0] // batch_size)
    padded = jnp.pad(data, ((0, batches * batch_size - data.shape[0]), (0, 0)))
    return padded.reshape(batches, batch_size, -1)


def make_evaluate(model, batch_size: int):
    """(state, data [N, D], key) -> {metric: mean over the N examples} of `model.evaluate`."""

    @jax.jit
    def evaluate(state, data, key):
        batches = _batched(data, batch_size)
        keys = jax.random.split(key, len(batches))
        per_example = jax.lax.map(
            lambda args: model.evaluate(state, args[0].astype(jnp.float32), args[1]), (batches, keys)
        )
        return {name: jnp.mean(values.reshape(-1)[: data.shape[0]]) for name, values in per_example.items()}

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


def _first_non_finite(losses, epoch: int, steps_per_epoch: int) -> None:
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        step = (epoch - 1) * steps_per_epoch + int(bad[0]) + 1
        return step, float(losses[bad[0]])
    return None


def run(cfg, run_dir: Path) -> dict:
    """Train `cfg.model` on `cfg.dataset`, evaluate the best epoch on the test set, and write
    metrics, checkpoints, pictures and `summary.json` into `run_dir`."""
    started = time.perf_counter()
    epochs = positive_int(cfg.trainer.epochs, "trainer.epochs")
    batch_size = positive_int(cfg.trainer.batch_size, "trainer.batch_size")
    num_samples = positive_int(cfg.eval.num_samples, "eval.num_samples")
    eval_batch_size = positive_int(cfg.eval.batch_size, "eval.batch_size")
    sample_batch = positive_int(cfg.eval.sample_batch, "eval.sample_batch")
    num_pictures = positive_int(cfg.trainer.num_pictures, "trainer.num_pictures")

    data = data_lib.load(cfg.dataset)
    if batch_size > len(data.train):
        raise DgmError(f"trainer.batch_size {batch_size} exceeds the {len(data.train)} training examples")
    steps_per_epoch = len(data.train) // batch_size
    make_optimizer = optim.optimizer_factory(cfg.optimizer, cfg.schedule, epochs, steps_per_epoch)
    model = models.build(cfg.model, data.dim, make_optimizer)
    log.info(
        "%s on %s: %d train / %d validation / %d test examples of %d pixels, %d steps per epoch",
        cfg.model.name, cfg.dataset.name, len(data.train), len(data.validation), len(data.test),
        data.dim, steps_per_epoch,
    )

    init_key, train_key, validation_key, test_key, picture_key = jax.random.split(
        jax.random.key(cfg.seed), 5
    )
    state = model.init(init_key)
    train_data, validation_data, test_data = jax.device_put((data.train, data.validation, data.test))
    train_epoch = make_train_epoch(model, batch_size)
    evaluate = make_evaluate(model, eval_batch_size)
    checkpoints = Checkpoints(run_dir / "checkpoints")
    examples_per_sec, best_epoch, best_value = [], None, math.inf
    with MetricsLog(run_dir) as metrics_log, logging_redirect_tqdm():
        try:
            bar = tqdm(range(1, epochs + 1), desc="epochs", disable=None if cfg.trainer.progress else True)
            for epoch in bar:
                epoch_started = time.perf_counter()
                state, step_metrics = train_epoch(state, train_data, jax.random.fold_in(train_key, epoch))
                step_metrics = jax.device_get(step_metrics)  # the epoch's one host transfer
                seconds = time.perf_counter() - epoch_started
                step = epoch * steps_per_epoch
                diverged = _first_non_finite(step_metrics["loss"], epoch, steps_per_epoch)
                if diverged:
                    last = checkpoints.latest_epoch()
                    kept = f"the last good checkpoint (epoch {last}) is in" if last else "no checkpoint was saved in"
                    raise DgmError(
                        f"training diverged: the loss became {diverged[1]} at epoch {epoch}, step "
                        f"{diverged[0]}; {kept} {checkpoints.directory} (try a lower optimizer.lr)"
                    )
                rate = steps_per_epoch * batch_size / seconds
                examples_per_sec.append(rate)
                train = {name: float(np.mean(values)) for name, values in step_metrics.items()}
                metrics_log.write("train", epoch, step, {**train, "examples_per_sec": rate, "seconds": seconds})
                validation = jax.device_get(evaluate(state, validation_data, jax.random.fold_in(validation_key, epoch)))
                validation = {name: float(value) for name, value in validation.items()}
                metrics_log.write("validation", epoch, step, validation)
                value = validation[model.selection_metric]
                checkpoints.save(epoch, state, value)
                if value < best_value:
                    best_epoch, best_value = epoch, value
                bar.set_postfix(loss=f"{train['loss']:.2f}", validation=f"{value:.2f}", best=best_epoch)
                log.info(
                    "epoch %d/%d: train loss %.3f, validation %s %.3f, %.0f examples/s",
                    epoch, epochs, train["loss"], model.selection_metric, value, rate,
                )

            if best_epoch is None:
                raise DgmError(f"validation {model.selection_metric} was never finite; nothing to evaluate")
            state = checkpoints.restore(best_epoch, like=state)
            log.info("evaluating epoch %d on the test set with %d importance samples", best_epoch, num_samples)
            log_likelihood, examples_per_call = make_log_likelihood(model, num_samples, sample_batch)
            test_log_p = test_log_likelihood(
                log_likelihood, examples_per_call, state, test_data, test_key, cfg.trainer.progress
            )
            test = {name: float(value) for name, value in jax.device_get(evaluate(state, test_data, test_key)).items()}
            test = {"nll": -float(np.mean(test_log_p)), **test}
            metrics_log.write("test", best_epoch, best_epoch * steps_per_epoch, test)
        finally:
            checkpoints.close()

    samples_key, reconstruction_key = jax.random.split(picture_key)
    pictures.save_grid(run_dir / "samples" / "samples.png", model.sample(state, samples_key, num_pictures), data.image_shape)
    originals = data.test[: num_pictures // 2]
    reconstructions = np.asarray(model.reconstruct(state, jnp.asarray(originals, jnp.float32), reconstruction_key))
    # Each row of originals is followed by the row of their reconstructions.
    columns = 8
    pairs = np.concatenate([originals.reshape(-1, columns, data.dim), reconstructions.reshape(-1, columns, data.dim)], axis=1)
    pictures.save_grid(run_dir / "samples" / "reconstructions.png", pairs.reshape(-1, data.dim), data.image_shape, columns)

    summary = {
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "test_nll": test["nll"],
        "test_nll_samples": 0 if model.exact_likelihood else num_samples,
        "test_neg_elbo": test["neg_elbo"],
        "best_epoch": best_epoch,
        f"best_validation_{model.selection_metric}": best_value,
        "epochs": epochs,
        "train_examples_per_sec": statistics.median(examples_per_sec[1:] or examples_per_sec),
        "wall_seconds": time.perf_counter() - started,
        "num_parameters": sum(leaf.size for leaf in jax.tree_util.tree_leaves(state)),
    }
    if data.true_test_nll is not None:
        summary["true_test_nll"] = data.true_test_nll
    write_json_atomically(run_dir / "summary.json", summary)
    log.info("test NLL %.2f nats (%d samples), test neg-ELBO %.2f, best epoch %d; run in %s",
             summary["test_nll"], num_samples, summary["test_neg_elbo"], best_epoch, run_dir)
    return summary

"""The jitted computations of a run, built from a model's contract: a training epoch, the
evaluation of a data set, and the (importance-sampled) log-likelihood.

The data sets live on the device as uint8 from the start; one epoch is one jitted call that
permutes the examples on the device and scans over the batches, so nothing returns to the host
between steps.
"""

import contextlib
import contextvars
import functools
import logging
import math
import threading
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dgm_cli import annealing, refinement

log = logging.getLogger(__name__)
DRAW = 0x0b1a  # folded into a step's key for the draw of its batch's pixels


def _float_pixels(batch: dict) -> dict:
    return {**batch, "x": batch["x"].astype(jnp.float32)}


def draw_pixels(levels, key):
    """Binary pixels drawn from grey levels 0..255 (dynamic binarisation): pixel d is on with
    probability levels_d / 255, independently.  [..., D] uint8 -> [..., D] uint8 in {0, 1}."""
    return (jax.random.uniform(key, levels.shape) * 255 < levels).astype(jnp.uint8)


def make_train_epoch(model, batch_size: int, devices, dynamic: bool = False):
    """(state, data {"x": [N, D] uint8, "labels"?: [N]}, key) -> (state, metrics, each [steps]):
    one jitted epoch, its batches spread over `devices`. `dynamic`: x holds grey levels, and
    every batch is drawn afresh from them."""

    @jax.jit
    def train_epoch(state, data, key):
        size = data["x"].shape[0]
        steps = size // batch_size  # the remainder sits out this epoch, not the next
        order_key, step_key = jax.random.split(key)
        # One step over the whole set (full-batch EM) reads it as it lies: its order is immaterial.
        order = None if batch_size == size else jax.random.permutation(order_key, size)[: steps * batch_size]

        def step(state, inputs):
            indices, key = inputs
            batch = devices.spread(data if indices is None else jax.tree.map(lambda array: array[indices], data))
            if dynamic:  # the draw's key is folded from the step's, which the model keeps
                batch = {**batch, "x": draw_pixels(batch["x"], jax.random.fold_in(key, DRAW))}
            return model.train_step(state, _float_pixels(batch), key)

        indices = None if order is None else order.reshape(steps, batch_size)
        return jax.lax.scan(step, state, (indices, jax.random.split(step_key, steps)))

    return train_epoch


def resident_train_split(train: dict, batch_size: int, dynamic: bool) -> dict:
    """The train split as the device keeps it for `make_train_epoch`: uint8, or, when one batch
    is the whole set of fixed pixels (full-batch EM), float32, converted once rather than in
    every epoch: that batch's float copy would be made anyway, so the peak memory is the same."""
    if dynamic or batch_size != train["x"].shape[0]:
        return train
    return {**train, "x": train["x"].astype(jnp.float32)}


def batched(array, batch_size: int):
    """[N, ...] -> [ceil(N / B), B, ...], the last batch padded with zeros (dropped later)."""
    batches = -(-array.shape[0] // batch_size)
    padding = [(0, batches * batch_size - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
    return jnp.pad(array, padding).reshape(batches, batch_size, *array.shape[1:])


def make_evaluate(model, batch_size: int, devices):
    """(state, data {"x": [N, D], …}, key) -> {metric: mean over the N examples of `model.evaluate`}."""

    @jax.jit
    def evaluate(state, data, key):
        batches = jax.tree.map(lambda array: batched(array, batch_size), data)
        keys = jax.random.split(key, batches["x"].shape[0])
        per_example = jax.lax.map(
            lambda args: model.evaluate(state, _float_pixels(devices.spread(args[0])), args[1]), (batches, keys)
        )
        size = data["x"].shape[0]
        return {name: jnp.mean(values.reshape(-1)[:size]) for name, values in per_example.items()}

    return evaluate


def has_diagnostics(model) -> bool:
    return hasattr(model, "recognition_gradient") or hasattr(model, "active_units")


def make_diagnostics(model, num_estimates: int, devices):
    """(state, batch, validation data, key) -> {name: float}, what `trainer.diagnostics_every`
    logs: for a model with `recognition_gradient`, the spread of `num_estimates` independent
    estimates g of q's gradient on the one `batch`, as estimator papers report it: "grad_variance",
    the mean over λ's parameters of each one's variance, and "grad_snr", ‖E g‖ / √(Σ Var g), the
    signal-to-noise ratio of the whole gradient (‖E g‖² estimated without the bias that the
    variance of the mean adds). A mean of per-parameter ratios (Rainforth et al. 2018) would be
    swamped by the near-deterministic gradients of saturated units; for a model with
    `active_units`, "active_units_l" for each stochastic layer l on the validation data."""

    @jax.jit
    def gradient_spread(state, batch, key):
        batch = _float_pixels(devices.spread(batch))

        def estimate(key):
            return jnp.concatenate([g.reshape(-1) for g in jax.tree.leaves(model.recognition_gradient(state, batch, key))])

        estimates = jax.lax.map(estimate, jax.random.split(key, num_estimates))  # [M, P], P parameters
        mean, variance = jnp.mean(estimates, 0), jnp.var(estimates, 0, ddof=1)
        total = jnp.sum(variance)
        signal = jnp.maximum(0.0, jnp.sum(jnp.square(mean)) - total / num_estimates)  # ‖E g‖², unbiased
        return {"grad_variance": jnp.mean(variance), "grad_snr": jnp.sqrt(signal / total)}

    def diagnose(state, batch, validation, key):
        found = {}
        if hasattr(model, "recognition_gradient"):
            found.update({name: float(value) for name, value in jax.device_get(gradient_spread(state, batch, key)).items()})
        if hasattr(model, "active_units"):
            found.update({f"active_units_{layer}": count
                          for layer, count in enumerate(active_units(model, state, validation, key), 1)})
        return found

    return diagnose


def describe_diagnostics(found: dict, num_estimates: int) -> str:
    parts = []
    if "grad_variance" in found:
        parts.append(f"q's gradient over {num_estimates} estimates: mean variance {found['grad_variance']:.3g}, "
                     f"mean SNR {found['grad_snr']:.3g}")
    units = [str(count) for name, count in found.items() if name.startswith("active_units_")]
    if units:
        parts.append(f"active units per layer {', '.join(units)}")
    return "; ".join(parts)


@functools.lru_cache(maxsize=8)
def _jitted_active_units(model):
    return jax.jit(lambda state, x, key: model.active_units(state, x.astype(jnp.float32), key))


def active_units(model, state, data: dict, key) -> list[int]:
    """[count per stochastic layer] of `model.active_units` over data {"x": [N, D] uint8, …}."""
    return [int(count) for count in jax.device_get(_jitted_active_units(model)(state, data["x"], key))]


def curve_sample_counts(num_samples: int) -> tuple[int, ...]:
    """The k at which the k-curve of an importance-sampled estimate is read: 1, 10, 100, … up
    to K = `num_samples`, and K/10 and K themselves, so that the last tenfold step is on it."""
    counts = {10**power for power in range(len(str(num_samples))) if 10**power <= num_samples} | {num_samples}
    if num_samples >= 10:
        counts.add(num_samples // 10)
    return tuple(sorted(counts))


def make_annealed_log_likelihood(model, ais, sample_batch: int):
    """(state, x [B, D], key) -> {"log_p": [B] log p(x) by annealed importance sampling, "log_ess"
    [B] over the chains, "acceptance" [B]} (`dgm_cli.annealing`) and the B to call it with: at
    most `sample_batch` / 100 (example, chain) pairs at once."""
    def log_likelihood(state, x, key):
        return annealing.log_likelihood(model.annealing_path(state, x.astype(jnp.float32)), key, ais)

    # A chain's T transitions cost hundreds of IS draws: batches of a hundredth of sample_batch's
    # pairs keep a batch's time near an IS batch's, so that the pass logs its progress and a
    # Ctrl-C (which waits for the running call) takes effect within one batch.
    return jax.jit(log_likelihood), max(1, sample_batch // (100 * ais.chains))


class GapSettings(NamedTuple):
    """What `dgm gaps` measures with: the refinement, the draws of each ELBO, log p(x)'s estimate."""
    refine: refinement.Settings
    elbo_samples: int  # draws from q (and from q*) for each image's ELBO
    num_samples: int  # importance samples from q* for log p(x), unless by AIS
    ais: annealing.Settings | None  # log p(x) by AIS instead


def make_gaps(model, gaps: GapSettings, sample_batch: int):
    """(state, x [B, D], key) -> per image {"elbo": L[q], "refined_elbo": L[q*], "log_p": log p(x),
    "refine_gain": how much the refined ELBO rose over the last tenth of its steps} and the B to
    call it with (`dgm gaps`; `dgm_cli.refinement`). Every draw comes in chunks of refine.samples
    per image, so that B images refine together however many draws the estimates take."""
    chunk = gaps.refine.samples

    def log_sum_of_weights(state, x, key, count, offsets):  # log Σ w, Σ log w over `count` draws, [B] each
        def add(sums, key):
            log_w = model.log_weights(state, x, key, chunk, offsets)
            return (jnp.logaddexp(sums[0], jax.nn.logsumexp(log_w, 0)), sums[1] + jnp.sum(log_w, 0)), None

        start = (jnp.full(x.shape[0], -jnp.inf), jnp.zeros(x.shape[0]))
        sums, _ = jax.lax.scan(add, start, jax.random.split(key, -(-count // chunk)))
        return sums[0] - jnp.log(-(-count // chunk) * chunk), sums[1] / (-(-count // chunk) * chunk)

    @jax.jit
    def measure(state, x, key):
        x = x.astype(jnp.float32)
        refine_key, elbo_key, key = jax.random.split(key, 3)
        offsets, curve = refinement.refine(model, state, x, refine_key, gaps.refine)
        tenth = max(1, gaps.refine.steps // 10)
        found = {"elbo": log_sum_of_weights(state, x, elbo_key, gaps.elbo_samples, None)[1],
                 "refined_elbo": log_sum_of_weights(state, x, elbo_key, gaps.elbo_samples, offsets)[1],
                 "refine_gain": jnp.mean(curve[-tenth:], 0) - jnp.mean(curve[-2 * tenth:-tenth], 0)}
        if gaps.ais is None:
            found["log_p"] = log_sum_of_weights(state, x, key, gaps.num_samples, offsets)[0]
        else:
            found["log_p"] = annealing.log_likelihood(model.annealing_path(state, x), key, gaps.ais)["log_p"]
        return found

    return measure, max(1, sample_batch // (10 * chunk))  # a tenth: refinement's steps cost more than IS's draws


def make_log_likelihood(model, num_samples: int, sample_batch: int, refine=None):
    """(state, x [B, D], key) -> {"log_p": [B] log p(x)} and the B to call it with. Importance
    sampled (`num_samples` samples each, from q, or with `refine` from q refined for each example
    first: `dgm_cli.refinement`) it also gives, from the same draws, "log_p_by_k"
    [B, len(curve_sample_counts)], the estimate from each example's first k samples, and
    "log_ess" [B], the log of the effective sample size (Σ w)² / Σ w². At most `sample_batch`
    (example, sample) pairs are evaluated at once, so memory stays bounded however many samples
    are asked for."""
    if model.exact_likelihood:
        exact = lambda state, x, key: {"log_p": model.log_likelihood(state, x.astype(jnp.float32), key, 0)}
        return jax.jit(exact), sample_batch
    chunk = min(sample_batch, num_samples)
    full_chunks, rest = divmod(num_samples, chunk)
    counts = jnp.asarray(curve_sample_counts(num_samples))  # [C], the last of them K

    @jax.jit
    def log_likelihood(state, x, key):
        x = x.astype(jnp.float32)
        offsets = None
        if refine is not None:  # its own key: without it, the draws are those of plain IS
            refine_key, key = jax.random.split(key)
            offsets, _ = refinement.refine(model, state, x, refine_key, refine)
        keys = jax.random.split(key, full_chunks + 1)

        # Running sums in log space, over the samples drawn so far: log Σ_{i<k} w_i for every k
        # of the curve (the last is k = K, the estimate itself), and log Σ w_i² for the ESS.
        def add_chunk(sums, key, offset, size=chunk):
            prefix_sums, log_sum_squares = sums
            log_w = model.log_weights(state, x, key, size, offsets)  # [size, B]
            running = jax.lax.cumlogsumexp(log_w, axis=0)  # [size, B]: log Σ of the chunk's first i + 1
            taken = jnp.clip(counts - offset, 0, size)  # [C] samples of this chunk within each k
            in_prefix = jnp.where((taken > 0)[:, None], running[jnp.maximum(taken - 1, 0)], -jnp.inf)
            return (jnp.logaddexp(prefix_sums, in_prefix),
                    jnp.logaddexp(log_sum_squares, jax.nn.logsumexp(2 * log_w, axis=0)))

        sums = (jnp.full((len(counts), x.shape[0]), -jnp.inf), jnp.full(x.shape[0], -jnp.inf))
        sums, _ = jax.lax.scan(lambda sums, inputs: (add_chunk(sums, *inputs), None), sums,
                               (keys[:-1], jnp.arange(full_chunks) * chunk))
        if rest:
            sums = add_chunk(sums, keys[-1], full_chunks * chunk, rest)
        prefix_sums, log_sum_squares = sums
        log_p_by_k = prefix_sums - jnp.log(counts)[:, None]
        return {"log_p": log_p_by_k[-1], "log_p_by_k": log_p_by_k.T, "log_ess": 2 * prefix_sums[-1] - log_sum_squares}

    return log_likelihood, max(1, sample_batch // chunk)


CALLS = 20  # jitted calls of the test pass: few, yet enough to report progress between them
LOG_EVERY_SECONDS = 30.0
COMPILE_NOTICE_SECONDS = 1.0  # longer than loading a program from JAX's cache takes


@contextlib.contextmanager
def compiling(what: str):
    """Say that `what` is being compiled once it has taken longer than a cache hit would, so
    that a first run's silent minute is explained (JAX does not say whether its cache holds a
    program before it looks)."""
    cache = jax.config.jax_compilation_cache_dir
    where = (f"once: JAX's cache in {cache} keeps it, and later runs of these shapes start in seconds" if cache
             else "cache_dir=null, so every run compiles its programs afresh")
    # In the caller's context, so that a packed job's notice goes to its own log (`dgm_cli.packing`).
    notice = threading.Timer(COMPILE_NOTICE_SECONDS, contextvars.copy_context().run,
                             [log.info, f"compiling {what} for these shapes ({where})"])
    notice.daemon = True
    notice.start()
    try:
        yield
    finally:
        notice.cancel()


@functools.lru_cache(maxsize=8)  # compiled once for a model, however often it is evaluated
def _batched_log_likelihood(model, num_samples: int, sample_batch: int, devices, ais=None, refine=None, gaps=None):
    """-> (state, x [n, B, D], keys [n]) -> {name: [n, B, ...]} of `make_log_likelihood` (of
    `make_annealed_log_likelihood` with `ais`, of `make_gaps` with `gaps`), jitted, and the batch size B."""
    log_likelihood, batch_size = (make_gaps(model, gaps, sample_batch) if gaps is not None
                                  else make_log_likelihood(model, num_samples, sample_batch, refine) if ais is None
                                  else make_annealed_log_likelihood(model, ais, sample_batch))

    @jax.jit
    def some_batches(state, x, keys):
        return jax.lax.map(lambda args: devices.gather(log_likelihood(state, devices.spread(args[0]), args[1])),
                           (x, keys))

    return some_batches, devices.round_up(batch_size)


def log_likelihoods(model, state, x: np.ndarray, key, num_samples: int, sample_batch: int, devices, progress: bool,
                    ais=None, refine=None, gaps=None):
    """{"log_p": [N] log p(x), and when sampled "log_p_by_k" [N, C] and "log_ess" [N] (see
    `make_log_likelihood`; with `ais`, annealed: see `make_annealed_log_likelihood`)} of every
    example of x [N, D] (on the host), in at most `CALLS` jitted calls,
    each a `lax.map` over batches of examples split over `devices`; the progress goes to a bar
    on a terminal and to the log every half minute, so that it shows under nohup and Slurm too."""
    some_batches, batch_size = _batched_log_likelihood(model, num_samples, sample_batch, devices, ais, refine, gaps)
    what = "gaps" if gaps is not None else "test log-likelihood" if ais is None else "AIS log-likelihood"
    size = x.shape[0]
    batches = -(-size // batch_size)
    keys = jax.random.split(key, batches)  # one per batch, however the batches are grouped
    per_call = -(-batches // CALLS)
    calls = -(-batches // per_call)
    padded = calls * per_call * batch_size  # the padding examples are computed and dropped
    x = np.pad(x, [(0, padded - size), (0, 0)]).reshape(calls, per_call, batch_size, -1)
    keys = jnp.concatenate([keys, keys[: calls * per_call - batches]]).reshape(calls, per_call)

    results, started, logged = [], time.perf_counter(), time.perf_counter()
    with compiling("the test pass" if ais is None and gaps is None else f"the {what} pass"):  # the first call compiles (or loads) the program
        running = some_batches(state, devices.put(x[0]), keys[0])
    for call in tqdm(range(calls), desc=what, leave=False, disable=None if progress else True):
        # The next call is queued before this one is waited for, so that the device never idles.
        queued = some_batches(state, devices.put(x[call + 1]), keys[call + 1]) if call + 1 < calls else None
        results.append({name: np.asarray(values).reshape(-1, *values.shape[2:]) for name, values in running.items()})
        running = queued
        now = time.perf_counter()
        if now - logged >= LOG_EVERY_SECONDS and call + 1 < calls:
            done = (call + 1) / calls
            log.info("%s: %d%% after %s, about %s left", what, round(100 * done),
                     _duration(now - started), _duration((now - started) * (1 - done) / done))
            logged = now
    return {name: np.concatenate([result[name] for result in results])[:size] for name in results[0]}


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"

"""The training loop: set up -> epochs (one jitted scan each) -> validation -> checkpoint ->
metrics, then the test evaluation of the best epoch, pictures and, last, `summary.json`.

It knows a model only through the contract of `dgm_cli.models`. A run directory that already
holds checkpoints is resumed from the latest one, which ends exactly as if the run had never
stopped: every epoch's random keys and data order follow from the seed and the epoch number.
"""

import dataclasses
import hashlib
import logging
import math
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import psutil
from omegaconf import OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import dgm_cli
from dgm_cli import data as data_lib
from dgm_cli import annealing, metrics, models, optim, pictures, refinement, runtime, steps, trackers, uncertainty
from dgm_cli.checkpoints import Checkpoints
from dgm_cli.errors import (DgmError, choice, integer, non_negative_float, non_negative_int, positive_float,
                            positive_int, probability)
from dgm_cli.metrics import MetricsLog, write_json_atomically
from dgm_cli.rundir import as_saved, training_config, with_current_defaults

log = logging.getLogger(__name__)


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
    data_parallel: bool
    diagnostics_every: int  # epochs between gradient-variance diagnostics; 0: none
    diagnostics_estimates: int
    patience: int  # epochs without a better validation value before training stops; 0: never
    min_delta: float  # how much lower than the best a validation value must be to count as better
    num_images: int | None  # test images measured, the first N; None: all
    ais: annealing.Settings | None  # eval.method=ais: how; None: importance sampling only
    refine: refinement.Settings | None  # eval.refine_steps > 0: q refined per example before IS; None: q

    @classmethod
    def from_config(cls, cfg) -> "Settings":
        integer(cfg.seed, "seed")  # checked with the rest, before any work, though `Keys` takes it
        batch_size = cfg.trainer.batch_size
        return cls(
            epochs=positive_int(cfg.trainer.epochs, "trainer.epochs"),
            batch_size=None if batch_size is None else positive_int(batch_size, "trainer.batch_size"),
            progress=bool(cfg.trainer.progress),
            num_pictures=positive_int(cfg.trainer.num_pictures, "trainer.num_pictures"),
            num_samples=positive_int(cfg.eval.num_samples, "eval.num_samples"),
            eval_batch_size=positive_int(cfg.eval.batch_size, "eval.batch_size"),
            sample_batch=positive_int(cfg.eval.sample_batch, "eval.sample_batch"),
            data_parallel=bool(cfg.trainer.data_parallel),
            diagnostics_every=non_negative_int(cfg.trainer.diagnostics_every, "trainer.diagnostics_every"),
            diagnostics_estimates=_at_least_two(cfg.trainer.diagnostics_estimates, "trainer.diagnostics_estimates"),
            patience=non_negative_int(cfg.trainer.patience, "trainer.patience"),
            min_delta=non_negative_float(cfg.trainer.min_delta, "trainer.min_delta"),
            num_images=None if cfg.eval.num_images is None else positive_int(cfg.eval.num_images, "eval.num_images"),
            ais=_ais_settings(cfg.eval),
            refine=refinement_settings(cfg.eval.refine_steps, cfg.eval),
        )


def _ais_settings(eval_cfg) -> annealing.Settings | None:
    if choice(eval_cfg.method, {"is": False, "ais": True}, "eval.method") is False:
        return None
    return annealing.Settings(
        steps=positive_int(eval_cfg.ais_steps, "eval.ais_steps"),
        chains=positive_int(eval_cfg.ais_chains, "eval.ais_chains"),
        leapfrog_steps=positive_int(eval_cfg.hmc_leapfrog_steps, "eval.hmc_leapfrog_steps"),
        step_size=positive_float(eval_cfg.hmc_step_size, "eval.hmc_step_size"),
        target_acceptance=probability(eval_cfg.hmc_target_acceptance, "eval.hmc_target_acceptance"))


def refinement_settings(steps, eval_cfg) -> refinement.Settings | None:
    """`steps` Adam steps of per-example refinement (`dgm_cli.refinement`) at eval.refine_lr with
    eval.refine_samples draws a step; None for 0 steps."""
    if non_negative_int(steps, "eval.refine_steps") == 0:
        return None
    return refinement.Settings(steps, positive_float(eval_cfg.refine_lr, "eval.refine_lr"),
                               _at_least_two(eval_cfg.refine_samples, "eval.refine_samples"))


def _at_least_two(value, name: str) -> int:
    if positive_int(value, name) < 2:
        raise DgmError(f"{name} must be at least 2: a variance needs two estimates, got {value}")
    return value


# The diagnostics key came after the others and is folded in, so that theirs stayed as they
# were. Under `jax_threefry_partitionable` (on off the CPU), split(root, n)[i] is fold_in(root, i),
# so it folds in a number no split of the others reaches.
DIAGNOSTICS_FOLD = 0xd1a6


class Keys(NamedTuple):
    """The root key of the seed, split once by purpose; epochs fold their number in."""

    init: jax.Array
    train: jax.Array
    validation: jax.Array
    test: jax.Array
    pictures: jax.Array
    diagnostics: jax.Array

    @classmethod
    def from_seed(cls, seed: int) -> "Keys":
        root = jax.random.key(seed)
        return cls(*jax.random.split(root, len(cls._fields) - 1), jax.random.fold_in(root, DIAGNOSTICS_FOLD))

    def picture_keys(self) -> tuple[jax.Array, jax.Array]:
        """(samples, reconstructions): the keys of the run's pictures."""
        samples, reconstructions = jax.random.split(self.pictures)
        return samples, reconstructions


@dataclasses.dataclass
class History:
    """A run's progress, saved with every checkpoint."""

    epoch: int = 0
    best_epoch: int | None = None
    best_value: float = math.inf
    examples_per_sec: list[float] = dataclasses.field(default_factory=list)

    def stop_reason(self, settings: Settings) -> str | None:
        """Why training ends here, or None while it goes on."""
        if self.epoch >= settings.epochs:
            return f"trainer.epochs={settings.epochs} reached"
        if settings.patience and self.best_epoch is not None and self.epoch - self.best_epoch >= settings.patience:
            return (f"trainer.patience={settings.patience}: no better validation value in the "
                    f"{self.epoch - self.best_epoch} epochs after epoch {self.best_epoch}")
        return None


def build_model(cfg, spec: data_lib.Spec, settings: Settings):
    """The configured model for data of this `spec`, its optimizer built for its schedule."""
    steps_per_epoch = spec.num_train // (settings.batch_size or spec.num_train)
    make_optimizer = optim.optimizer_factory(cfg.optimizer, cfg.schedule, settings.epochs, steps_per_epoch)
    return models.build(cfg.model, spec, make_optimizer)


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


def record_epoch(model, epoch: int, step_metrics: dict, seconds: float, validation: dict, state, history: History,
                 settings: Settings, checkpoints: Checkpoints, metrics_log: MetricsLog, record: dict,
                 diagnose=None) -> dict:
    """The end of a trained epoch, alone or in a packed group (`dgm_cli.packing`): stop at a
    non-finite loss, log the epoch's train and validation figures (and `diagnose()`'s, on the
    epochs of trainer.diagnostics_every), update `history` and checkpoint `state` with `record`.
    `step_metrics`: the epoch's per-step metrics on the host. -> the train figures."""
    steps_per_epoch = len(step_metrics["loss"])
    _check_finite(step_metrics["loss"], epoch, steps_per_epoch, checkpoints)
    rate = steps_per_epoch * settings.batch_size / seconds
    step = epoch * steps_per_epoch
    train = {name: float(np.mean(values)) for name, values in step_metrics.items()}
    metrics_log.write("train", epoch, step, {**train, "examples_per_sec": rate, "seconds": seconds})
    validation = {name: float(value) for name, value in validation.items()}
    metrics_log.write("validation", epoch, step, validation)
    if diagnose and epoch % settings.diagnostics_every == 0:
        found = diagnose()
        metrics_log.write("diagnostics", epoch, step, found)
        log.info("epoch %d: %s", epoch, steps.describe_diagnostics(found, settings.diagnostics_estimates))

    value = validation[model.selection_metric]
    history.epoch = epoch
    history.examples_per_sec.append(rate)
    if value < history.best_value - settings.min_delta:
        history.best_epoch, history.best_value = epoch, value
    # Only the best epoch competes to be kept as the best: with trainer.min_delta a lower
    # validation value need not count as better.
    checkpoints.save(epoch, state, value if history.best_epoch == epoch else math.inf,
                     {**record, "history": dataclasses.asdict(history)})
    log.info("epoch %d/%d: train loss %.3f, validation %s %.3f, %.0f examples/s",
             epoch, settings.epochs, train["loss"], model.selection_metric, value, rate)
    return train


def fixed_diagnostics_batch(splits, keys: Keys, settings: Settings, dynamic: bool) -> dict:
    """The one training batch on which the diagnostics measure the estimator's noise."""
    fixed_batch = jax.tree.map(lambda array: array[: settings.batch_size], splits["train"])
    if dynamic:  # drawn once, from grey levels
        fixed_batch = {**fixed_batch, "x": steps.draw_pixels(fixed_batch["x"], keys.diagnostics)}
    return fixed_batch


def train_epochs(model, train_epoch, state, history, splits, keys, settings, devices, checkpoints, metrics_log, record,
                 dynamic: bool = False):
    """Every epoch after `history.epoch`: train (one call of the compiled `train_epoch`),
    validate, checkpoint with `record`, log. `dynamic`: the train split holds grey levels."""
    evaluate = steps.make_evaluate(model, settings.eval_batch_size, devices)
    diagnose = settings.diagnostics_every and steps.make_diagnostics(model, settings.diagnostics_estimates, devices)
    fixed_batch = fixed_diagnostics_batch(splits, keys, settings, dynamic)
    bar = tqdm(range(history.epoch + 1, settings.epochs + 1), desc="epochs", initial=history.epoch,
               total=settings.epochs, disable=None if settings.progress else True)
    for epoch in bar:
        if history.stop_reason(settings):  # patience ran out, before a kill or in this process
            bar.close()
            log.info("stopped at epoch %d: %s", history.epoch, history.stop_reason(settings))
            break
        started = time.perf_counter()
        state, step_metrics = train_epoch(state, splits["train"], jax.random.fold_in(keys.train, epoch))
        step_metrics = jax.device_get(step_metrics)  # the epoch's one host transfer
        seconds = time.perf_counter() - started
        validation = evaluate(state, splits["validation"], jax.random.fold_in(keys.validation, epoch))
        diagnostics = diagnose and (lambda: diagnose(state, fixed_batch, splits["validation"],
                                                     jax.random.fold_in(keys.diagnostics, epoch)))
        train = record_epoch(model, epoch, step_metrics, seconds, validation, state, history, settings, checkpoints,
                             metrics_log, record, diagnostics)
        bar.set_postfix(loss=f"{train['loss']:.2f}", validation=f"{float(validation[model.selection_metric]):.2f}",
                        best=history.best_epoch)
    check_trained(model, history)
    return state


def check_trained(model, history: History) -> None:
    if history.best_epoch is None:
        raise DgmError(f"validation {model.selection_metric} was never finite; nothing to evaluate")


def evaluate_test(model, state, test_data: dict, key, settings, devices) -> tuple[dict, np.ndarray]:
    """The test figures (`uncertainty.summarise`: the NLL, exact or importance sampled, with its
    standard error and, sampled, its k-curve, ESS and convergence) and the other test metrics, of
    the test split as the host holds it ({"x": [N, D] uint8, "labels"?: [N]}); and the per-image
    log p(x) [N] float32 behind them."""
    evidence = steps.log_likelihoods(model, state, test_data["x"], key, settings.num_samples,
                                     settings.sample_batch, devices, settings.progress, refine=settings.refine)
    counts = None if model.exact_likelihood else steps.curve_sample_counts(settings.num_samples)
    others = steps.make_evaluate(model, settings.eval_batch_size, devices)(state, devices.put(test_data), key)
    figures = {**uncertainty.summarise(evidence, counts), **{name: float(value) for name, value in others.items()}}
    return figures, evidence["log_p"].astype(np.float32)


def test_evaluation(model, state, test_data: dict, seed, epoch: int, settings, devices, command: str):
    """The test figures of `epoch`'s parameters, the same as a record of `evaluations.jsonl`,
    which adds how they were measured (the sample count, 0 when exact, and the seed), on which
    images (a digest of the test set) and when, and the per-image log p(x) [N] behind them."""
    how = "exactly" if model.exact_likelihood else f"with {settings.num_samples} importance samples per example"
    refine = settings.refine and {"refine_steps": settings.refine.steps, "refine_lr": settings.refine.learning_rate,
                                  "refine_samples": settings.refine.samples}
    if refine:
        how += f" from q refined for each by {refine['refine_steps']} Adam steps"
    log.info("testing epoch %d %s", epoch, how)
    started = time.perf_counter()
    test, per_image = evaluate_test(model, state, test_data, Keys.from_seed(seed).test, settings, devices)
    if not test["converged"]:
        log.warning("the test NLL has not converged: %s; more eval.num_samples (dgm eval RUN eval.num_samples=N) "
                    "would tell how far it is from log p(x)", test["convergence"])
    return test, {"epoch": epoch, "method": "exact" if model.exact_likelihood else "is",
                  "num_samples": 0 if model.exact_likelihood else settings.num_samples, **(refine or {}),
                  "seed": seed, **test, "images": len(per_image), "test_images": _digest(test_data),
                  "seconds": time.perf_counter() - started, "command": command,
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, per_image


def test_images(test_data: dict, settings) -> dict:
    """The test split, or its first `eval.num_images` examples."""
    if settings.num_images is None:
        return test_data
    return jax.tree.map(lambda array: array[: settings.num_images], test_data)


def check_evaluation(model, settings) -> None:
    """eval.method=ais and eval.refine_steps need a model of latent variables whose likelihood is not exact."""
    for asked, option, needs in ((settings.ais, "eval.method=ais", "annealing_path"),
                                 (settings.refine, "eval.refine_steps", "refinement_objective")):
        if asked is not None and (model.exact_likelihood or not hasattr(model, needs)):
            raise DgmError(f"{option}: this model's likelihood is exact, so there is no posterior to "
                           f"{'anneal towards' if needs == 'annealing_path' else 'refine'}; its test figure is exact as it is")


def ais_evaluation(model, state, test_data: dict, seed, epoch: int, settings, devices, command: str):
    """The test NLL of `epoch`'s parameters by annealed importance sampling (`settings.ais`): the
    record of `evaluations.jsonl` (method "ais", with its steps, chains, HMC settings, seed, the
    NLL and its standard error, the chains' ESS, HMC's acceptance, time) and the per-image log p(x) [N]."""
    ais = settings.ais
    log.info("testing epoch %d by AIS: %d steps, %d chains per image, on %d images", epoch, ais.steps, ais.chains,
             test_data["x"].shape[0])
    started = time.perf_counter()
    evidence = steps.log_likelihoods(model, state, test_data["x"], Keys.from_seed(seed).test, 0, settings.sample_batch,
                                     devices, settings.progress, ais)
    figures = uncertainty.summarise_annealed(evidence, ais.chains)
    how = {"ais_steps": ais.steps, "ais_chains": ais.chains}
    if "acceptance" in figures:  # HMC moved the chains
        how.update(hmc_leapfrog_steps=ais.leapfrog_steps, hmc_step_size=ais.step_size,
                   hmc_target_acceptance=ais.target_acceptance)
    record = {"epoch": epoch, "method": "ais", "num_samples": None, **how, "seed": seed, **figures,
              "images": int(test_data["x"].shape[0]), "test_images": _digest(test_data),
              "seconds": time.perf_counter() - started, "command": command,
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return record, evidence["log_p"].astype(np.float32)


def describe_ais(record: dict) -> str:
    """"92.80 ± 0.27 nats (AIS, 1000 steps × 4 chains)"."""
    return (f"{record['nll']:.2f} ± {record['nll_stderr']:.2f} nats (AIS, {record['ais_steps']} steps × "
            f"{record['ais_chains']} chains)")


def _digest(test_data: dict) -> str:
    return hashlib.blake2b(np.ascontiguousarray(test_data["x"]).data, digest_size=16).hexdigest()


def describe_test(figures: dict, num_samples: int) -> str:
    """"93.66 ± 0.27 nats (5000 samples)", with "(exact)" or ", not converged" as it was measured."""
    how = "exact" if not num_samples else f"{num_samples} samples" + ("" if figures.get("converged", True)
                                                                      else ", not converged")
    stderr = figures.get("nll_stderr")
    return f"{figures['nll']:.2f}" + (f" ± {stderr:.2f}" if stderr is not None else "") + f" nats ({how})"


def describe_devices(devices) -> list[str]:
    """The devices a run computes on, as a person names them: ["cpu"], ["NVIDIA H100 80GB HBM3"] …"""
    used = jax.devices() if devices.parallel else jax.devices()[:1]
    return [device.device_kind for device in used]


def save_pictures(model, state, test_images, image_shape, keys: Keys, count: int, run_dir: Path,
                  write: bool) -> dict[str, Path]:
    """Samples, reconstructions and the model's own pictures. On several hosts every process
    takes part in drawing them, and only the one that `write`s saves them. -> {name: PNG path}."""
    originals = test_images[: max(1, count // 2)]

    @jax.jit  # one program, which JAX's cache keeps, rather than an op-by-op second of dispatch
    def draw(state, originals, samples_key, reconstruction_key):
        return (model.sample(state, samples_key, count), model.reconstruct(state, originals, reconstruction_key),
                model.extra_pictures(state))

    samples, reconstructions, extra = jax.device_get(
        draw(state, jnp.asarray(originals, jnp.float32), *keys.picture_keys()))
    if not write:
        return {}
    saved = {name: run_dir / "samples" / f"{name}.png" for name in ("samples", "reconstructions", *extra)}
    pictures.save_grid(saved["samples"], samples, image_shape)
    pictures.save_pairs(saved["reconstructions"], originals, reconstructions, image_shape)
    for name, images in extra.items():
        pictures.save_grid(saved[name], images[:count], image_shape)
    return saved


def _resume(checkpoints: Checkpoints, record: dict, like):
    """(state, History) from the run's latest checkpoint, or None for a fresh run. `record`:
    what this run would save, to check that the checkpoints are of the same config and data."""
    epoch = checkpoints.latest_epoch()
    if epoch is None:
        return None
    saved = checkpoints.record(epoch)
    # A run saved before dgm gained a setting ran with its default.
    saved_config = training_config(with_current_defaults(OmegaConf.create(saved["config"])))
    if as_saved(saved_config, record["config"], checkpoints.directory.parent) != saved_config:
        raise DgmError(f"{checkpoints.directory} holds checkpoints of another config; resume it "
                       f"with `dgm train resume={checkpoints.directory.parent}`, or choose a new hydra.run.dir")
    if saved.get("data_fingerprint", record["data_fingerprint"]) != record["data_fingerprint"]:
        raise DgmError(f"the data of {record['config']['dataset']['name']} changed since the checkpoint of epoch "
                       f"{epoch} in {checkpoints.directory}; a run goes on only with the data it began with")
    log.info("resuming from the checkpoint of epoch %d", epoch)
    return checkpoints.restore(epoch, like), History(**saved["history"])


_process_started = psutil.Process().create_time()  # the first run's start-up counts the imports


def startup_began() -> float:
    """When this run's start-up began: the process's start for the first run of a process, whose
    start-up counts the imports, now for any later one."""
    global _process_started
    began, _process_started = _process_started or time.time(), None
    return began


@dataclasses.dataclass(frozen=True)
class Setup:
    """A run's config made ready to train: its settings checked, its data loaded, its model built."""

    cfg: object
    settings: Settings
    data: data_lib.Data
    model: object
    devices: runtime.Devices

    @property
    def steps_per_epoch(self) -> int:
        return len(self.data.train) // self.settings.batch_size

    @property
    def keys(self) -> Keys:
        return Keys.from_seed(self.cfg.seed)

    def record(self) -> dict:
        """What every checkpoint of the run saves beside its state, and what a resume checks."""
        return {"config": training_config(self.cfg), "spec": dataclasses.asdict(self.data.spec),
                "data_fingerprint": self.data.fingerprint()}


def set_up(cfg, data: data_lib.Data | None = None) -> Setup:
    """Check `cfg`, load its data (or take `data`, already loaded for it) and build its model,
    saying what will run. A bad setting raises DgmError before any work."""
    cfg = with_current_defaults(cfg)  # a resumed run saved before a setting existed lacks it
    cache_dir = runtime.configure(cfg)
    settings = Settings.from_config(cfg)
    data = data or data_lib.load(cfg.dataset, cache_dir and cache_dir / "data")
    if settings.batch_size is None:
        settings = dataclasses.replace(settings, batch_size=len(data.train))
    if settings.batch_size > len(data.train):
        raise DgmError(f"trainer.batch_size {settings.batch_size} exceeds the {len(data.train)} training examples")
    model = build_model(cfg, data.spec, settings)
    check_evaluation(model, settings)
    if settings.diagnostics_every and not steps.has_diagnostics(model):
        having = ", ".join(name for name, family in models.MODELS.items() if steps.has_diagnostics(family))
        raise DgmError(f"trainer.diagnostics_every needs a model with diagnostics ({having}); "
                       f"model={cfg.model.name} has none, so leave trainer.diagnostics_every=0")
    devices = runtime.Devices(settings.data_parallel, {"trainer.batch_size": settings.batch_size,
                                                       "eval.batch_size": settings.eval_batch_size})
    setup = Setup(cfg, settings, data, model, devices)
    log.info("%s on %s: %d train / %d validation / %d test examples of %d pixels, %d steps per epoch",
             cfg.model.name, cfg.dataset.name, len(data.train), len(data.validation), len(data.test),
             data.dim, setup.steps_per_epoch)
    if data.dynamic:
        log.info("the training images are binarised afresh every epoch (dataset.binarize=dynamic)")
    log.info("computing on %d device(s): %s", len(describe_devices(devices)), ", ".join(describe_devices(devices)))
    return setup


def start(setup: Setup, checkpoints: Checkpoints, record: dict):
    """(state, History): the run's initial state, or where its latest checkpoint left it."""
    state = jax.jit(setup.model.init)(setup.keys.init)
    state, history = _resume(checkpoints, record, like=state) or (state, History())
    return setup.devices.put(state), history


def run(cfg, run_dir: Path) -> dict:
    """Train `cfg.model` on `cfg.dataset` in `run_dir` (or go on where a killed run stopped),
    evaluate the best epoch on the test set, and write everything into `run_dir`."""
    started_at = startup_began()
    started = time.perf_counter()
    if (run_dir / "summary.json").is_file():  # finished already: nothing to do
        return OmegaConf.to_container(OmegaConf.load(run_dir / "summary.json"))
    setup = set_up(cfg)
    model, settings, data, devices, keys = setup.model, setup.settings, setup.data, setup.devices, setup.keys
    primary = jax.process_index() == 0  # of several hosts, one writes the run's files
    run_dir.mkdir(parents=True, exist_ok=True)
    splits = devices.put({split: data.batches()[split] for split in ("train", "validation")})  # test: later
    splits["train"] = steps.resident_train_split(splits["train"], settings.batch_size, data.dynamic)
    record = setup.record()
    with Checkpoints(run_dir / "checkpoints") as checkpoints:
        state, history = start(setup, checkpoints, record)
        # Compiled ahead, so that no epoch's time includes compiling.
        with steps.compiling("the training epoch"):
            train_epoch = steps.make_train_epoch(model, settings.batch_size, devices, data.dynamic).lower(
                state, splits["train"], keys.train).compile()
        record["startup_seconds"] = time.time() - started_at
        with trackers.tracking(setup.cfg, run_dir, history.epoch * setup.steps_per_epoch, primary) as tracker:
            with MetricsLog(run_dir, history.epoch, primary, tracker) as metrics_log, logging_redirect_tqdm():
                state = train_epochs(model, train_epoch, state, history, splits, keys, settings, devices,
                                     checkpoints, metrics_log, record, data.dynamic)
                return finish(setup, state, history, checkpoints, metrics_log, tracker, run_dir, record, started)


def finish(setup: Setup, state, history: History, checkpoints: Checkpoints, metrics_log: MetricsLog, tracker,
           run_dir: Path, record: dict, started: float, extra: dict | None = None) -> dict:
    """After the last epoch: test the best epoch's parameters, save the pictures, and write
    `summary.json` (with `extra`'s entries), last. -> the summary."""
    model, settings, data, devices, keys, cfg = (setup.model, setup.settings, setup.data, setup.devices, setup.keys,
                                                 setup.cfg)
    primary = jax.process_index() == 0
    steps_per_epoch = setup.steps_per_epoch
    state = checkpoints.restore(history.best_epoch, like=state)
    test_data = test_images(data.batches()["test"], settings)
    test, evaluation, per_image = test_evaluation(model, state, test_data, cfg.seed,
                                                  history.best_epoch, settings, devices, "dgm train")
    metrics_log.write("test", history.best_epoch, history.best_epoch * steps_per_epoch,
                      {name: value for name, value in test.items() if isinstance(value, float)})
    annealed = None  # eval.method=ais: its record, beside the headline's
    if settings.ais:
        annealed, annealed_per_image = ais_evaluation(model, state, test_data, cfg.seed,
                                                      history.best_epoch, settings, devices, "dgm train")
    if primary:
        evaluation = metrics.append_evaluation(run_dir, evaluation, per_image)
        if annealed:
            annealed = metrics.append_evaluation(run_dir, annealed, annealed_per_image)
    pictures = save_pictures(model, state, data.test, data.image_shape, keys, settings.num_pictures, run_dir,
                             primary)
    summary = {
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        **metrics.headline_figures(evaluation),
        **(metrics.annealed_figures(annealed) if annealed else {}),
        "best_epoch": history.best_epoch,
        f"best_validation_{model.selection_metric}": history.best_value,
        "epochs": settings.epochs,
        "epochs_trained": history.epoch,
        "stop_reason": history.stop_reason(settings),
        "train_examples_per_sec": statistics.median(history.examples_per_sec[1:] or history.examples_per_sec),
        "wall_seconds": time.perf_counter() - started,
        "startup_seconds": record.get("startup_seconds"),
        "devices": describe_devices(devices),
        "dgm_version": dgm_cli.__version__,
        **(extra or {}),
    }
    if hasattr(model, "active_units"):  # of the tested parameters, on the validation set
        summary["active_units"] = steps.active_units(model, state, devices.put(data.batches()["validation"]),
                                                     keys.diagnostics)
    if data.true_test_nll is not None:
        summary["true_test_nll"] = data.true_test_nll
    tracker.finish(summary, pictures, history.epoch * steps_per_epoch)
    if primary:
        write_json_atomically(run_dir / "summary.json", summary)
    log.info("test NLL %s%s, test neg-ELBO %.2f, best epoch %d; run directory %s",
             describe_test(test, evaluation["num_samples"]), f", {describe_ais(annealed)}" if annealed else "",
             test["neg_elbo"], history.best_epoch, run_dir)
    return summary

"""Packed runs: the jobs of a sweep that differ only in numbers train as one vmapped program.

Jobs whose configs are equal but for a seed, a learning rate, a weight decay, a KL warm-up or
their early stopping run the same computation on different numbers, so `jax.vmap` trains them
together: their states stacked along a leading axis, the data shared, one compiled epoch for all.
Each job keeps everything else of its own: its keys (from its seed), its run directory with its
checkpoints, metrics, log, test figures and summary, its early stopping and its failures. A job
that has stopped, failed or got ahead of the others (resumed from a later epoch) is masked: its
lane computes and its result is dropped, so the program never changes shape.

`hydra/launcher=packed` (hydra_plugins/dgm_launcher) groups a sweep's jobs with `groups` and
trains each group with `train`; every packed run reads, resumes and reruns as a run of its own.
"""

import contextlib
import contextvars
import dataclasses
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import OmegaConf

from dgm_cli import loop, steps, trackers
from dgm_cli.checkpoints import Checkpoints
from dgm_cli.errors import positive_int
from dgm_cli.metrics import MetricsLog
from dgm_cli.rundir import training_config, with_current_defaults

log = logging.getLogger(__name__)

# Numbers that enter a job's program as values, not as its shape: inside a group's program
# each is an array of the jobs' values wherever they differ.
PER_JOB_NUMBERS = ("optimizer.lr", "optimizer.weight_decay", "model.kl_warmup_epochs")
# Settings that the host applies to each job between epochs.
PER_JOB_SETTINGS = ("seed", "trainer.patience", "trainer.min_delta")
PACKABLE = PER_JOB_NUMBERS + PER_JOB_SETTINGS


def group_key(cfg) -> str | None:
    """What jobs must share to pack together: the config less its PACKABLE values, with only
    whether each per-job number is zero (a zero can switch a term off, and so change the
    program); None for a job that trains alone: one split over several devices or hosts."""
    cfg = with_current_defaults(cfg)
    if cfg.trainer.data_parallel or cfg.distributed.coordinator_address:
        return None
    config = training_config(cfg)
    config["trainer"]["pack_size"] = cfg.trainer.pack_size
    for key in PACKABLE:
        section, _, name = key.rpartition(".")
        node = config[section] if section else config
        if name in node:
            value = node.pop(name)
            if key in PER_JOB_NUMBERS:
                node[f"{name} is zero"] = value == 0
    return OmegaConf.to_yaml(OmegaConf.create(config))


def groups(configs: list) -> list[list[int]]:
    """The jobs (indices into `configs`, in order) that train together, each group at most
    `trainer.pack_size` jobs; a job that cannot pack is a group of its own."""
    found: dict[str, list[list[int]]] = {}
    alone = []
    for index, cfg in enumerate(configs):
        key = group_key(cfg)
        if key is None or positive_int(cfg.trainer.pack_size, "trainer.pack_size") == 1:
            alone.append([index])
            continue
        chunks = found.setdefault(key, [[]])
        if len(chunks[-1]) >= cfg.trainer.pack_size:
            chunks.append([])
        chunks[-1].append(index)
    return sorted([chunk for chunks in found.values() for chunk in chunks] + alone)


# The job of a group whose work is running now, for the log: its lines go to its own train.log.
_current_job = contextvars.ContextVar("packed_job", default=None)


@contextlib.contextmanager
def _as_job(index: int):
    token = _current_job.set(index)
    try:
        yield
    finally:
        _current_job.reset(token)


class _OwnLines(logging.Filter):
    """A job's train.log takes the group's lines and its own, not the other jobs'."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def filter(self, record) -> bool:
        return _current_job.get() in (None, self.index)


class _GroupLines(logging.Filter):
    """The terminal takes the group's lines and each job's warnings, not every job's every epoch."""

    def filter(self, record) -> bool:
        return _current_job.get() is None or record.levelno >= logging.WARNING


@contextlib.contextmanager
def _job_logs(run_dirs: list[Path], logging_config):
    """Each job's lines into its own train.log, in `logging_config`'s format (Hydra's job_logging)."""
    formatter = logging_config.formatters.simple
    root = logging.getLogger()
    consoles = [handler for handler in root.handlers if not isinstance(handler, logging.FileHandler)]
    files = []
    for index, run_dir in enumerate(run_dirs):
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter(formatter.format, formatter.datefmt))
        handler.addFilter(_OwnLines(index))
        files.append(handler)
    group_lines = _GroupLines()
    level = root.level
    root.setLevel(logging.INFO)
    for handler in files:
        root.addHandler(handler)
    for handler in consoles:
        handler.addFilter(group_lines)
    try:
        yield
    finally:
        root.setLevel(level)
        for handler in consoles:
            handler.removeFilter(group_lines)
        for handler in files:
            root.removeHandler(handler)
            handler.close()


def _stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _job_of(tree, index: int):
    return jax.tree.map(lambda leaf: leaf[index], tree)


@dataclasses.dataclass
class _Job:
    """A job of the group and what it has of its own."""

    index: int  # among the group's jobs, as the caller gave them
    lane: int  # in the stacked states: among the jobs that set up
    setup: loop.Setup
    run_dir: Path
    resources: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)
    checkpoints: Checkpoints | None = None
    metrics_log: MetricsLog | None = None
    tracker: object = None
    history: loop.History | None = None
    record: dict | None = None
    outcome: object = None  # its summary, or the exception that ended it

    @property
    def training(self) -> bool:
        return self.outcome is None

    def fail(self, error: Exception):
        """End this job, not the group's others: its tracker closes as failed, its checkpoints
        and metrics as a sequential run's would on the same error."""
        log.error("this job failed: %s", error)
        self.outcome = error
        self.resources.__exit__(type(error), error, error.__traceback__)


def _per_job_numbers(setups: list[loop.Setup]) -> dict[str, np.ndarray]:
    """{key: [N] float32} of the PER_JOB_NUMBERS whose values differ between the jobs."""
    found = {}
    for key in PER_JOB_NUMBERS:
        values = [OmegaConf.select(setup.cfg, key) for setup in setups]
        if len(set(values)) > 1:
            found[key] = np.asarray(values, np.float32)
    return found


def _same_program(one, other) -> bool:
    """Whether two configs of a group build the same model: equal in their per-job numbers (the
    seed and early stopping are the loop's, not the model's)."""
    return all(OmegaConf.select(one, key) == OmegaConf.select(other, key) for key in PER_JOB_NUMBERS)


def _model_builder(setup: loop.Setup):
    """`build(numbers)`: the model of `setup`'s config with `numbers` ({key: value}, traced
    inside the group's program) in place of its own."""
    config = OmegaConf.to_container(setup.cfg, resolve=True)

    def build(numbers: dict):
        traced = OmegaConf.create(config, flags={"allow_objects": True})
        for key, value in numbers.items():
            OmegaConf.update(traced, key, value)
        return loop.build_model(traced, setup.data.spec, setup.settings)

    return build


def _group_programs(setup: loop.Setup, build):
    """The group's jitted epoch and validation, each one vmapped program over the jobs:
    train(states, data, keys, numbers, training) -> (states, metrics), the states of the jobs not
    `training` kept as they were; evaluate(states, data, keys, numbers) -> {metric: [N]}."""
    settings, devices = setup.settings, setup.devices

    def train_one(state, data, key, numbers, training):
        model = build(numbers)
        trained, metrics = steps.make_train_epoch(model, settings.batch_size, devices, setup.data.dynamic)(
            state, data, key)
        return jax.tree.map(lambda new, old: jnp.where(training, new, old), trained, state), metrics

    def evaluate_one(state, data, key, numbers):
        return steps.make_evaluate(build(numbers), settings.eval_batch_size, devices)(state, data, key)

    train = jax.jit(jax.vmap(train_one, in_axes=(0, None, 0, 0, 0)), donate_argnums=0)
    evaluate = jax.jit(jax.vmap(evaluate_one, in_axes=(0, None, 0, 0)))
    return train, evaluate


def train(configs: list, run_dirs: list[Path], logging_config) -> list:
    """Train the jobs `configs` (equal in their `group_key`) as one group, each in its run
    directory (claimed by the caller), and test each. -> per job its summary, or the exception
    that ended it; the others go on. `logging_config`: the format of their train.log files."""
    started_at = loop.startup_began()
    started = time.perf_counter()
    with _job_logs(run_dirs, logging_config), contextlib.ExitStack() as stack:
        log.info("training %d jobs packed into one program: %s", len(configs), ", ".join(map(str, run_dirs)))
        jobs, data, outcomes = [], None, {}
        for index, (cfg, run_dir) in enumerate(zip(configs, run_dirs)):
            with _as_job(index):
                try:
                    setup = loop.set_up(cfg, data)
                except Exception as error:  # a bad setting of this job's own
                    log.error("this job failed: %s", error)
                    outcomes[index] = error
                    continue
            data = setup.data
            twin = next((job.setup for job in jobs if _same_program(job.setup.cfg, setup.cfg)), None)
            if twin is not None:  # one model for both, so that its test pass compiles once
                setup = dataclasses.replace(setup, model=twin.model)
            jobs.append(_Job(index, len(jobs), setup, run_dir))
        if not jobs:
            return [outcomes[index] for index in range(len(configs))]
        first = jobs[0].setup
        splits = first.devices.put({split: data.batches()[split] for split in ("train", "validation")})
        splits["train"] = steps.resident_train_split(splits["train"], first.settings.batch_size, data.dynamic)
        states = []
        for job in jobs:
            with _as_job(job.index):
                stack.enter_context(job.resources)  # closed with the group, unless the job fails first
                job.checkpoints = job.resources.enter_context(Checkpoints(job.run_dir / "checkpoints"))
                job.record = job.setup.record()
                state, job.history = loop.start(job.setup, job.checkpoints, job.record)
                states.append(state)
        numbers = {key: jnp.asarray(values) for key, values in _per_job_numbers([job.setup for job in jobs]).items()}
        if numbers:
            log.info("per job: %s", "; ".join(f"{key} {', '.join(f'{v:g}' for v in values)}"
                                            for key, values in numbers.items()))
        build = _model_builder(first)
        train_group, evaluate_group = _group_programs(first, build)
        states = _stack(states)
        with steps.compiling(f"the training epoch of {len(jobs)} packed jobs"):
            train_group = train_group.lower(states, splits["train"], _stack([first.keys.train] * len(jobs)), numbers,
                                            jnp.ones(len(jobs), bool)).compile()
        for job in jobs:
            job.record["startup_seconds"] = time.time() - started_at
            steps_so_far = job.history.epoch * job.setup.steps_per_epoch
            job.tracker = job.resources.enter_context(trackers.tracking(job.setup.cfg, job.run_dir, steps_so_far, True))
            job.metrics_log = job.resources.enter_context(MetricsLog(job.run_dir, job.history.epoch, True, job.tracker))
        states = _train_epochs(jobs, train_group, evaluate_group, states, splits, numbers)
        for job in jobs:
            if job.training:
                with _as_job(job.index):
                    try:
                        loop.check_trained(job.setup.model, job.history)
                        job.outcome = loop.finish(job.setup, _job_of(states, job.lane), job.history, job.checkpoints,
                                                  job.metrics_log, job.tracker, job.run_dir, job.record, started,
                                                  {"packed_jobs": len(jobs)})
                    except Exception as error:  # this job's failure, not the group's
                        job.fail(error)
        outcomes.update({job.index: job.outcome for job in jobs})
        return [outcomes[index] for index in range(len(configs))]


def _train_epochs(jobs: list[_Job], train_group, evaluate_group, states, splits, numbers):
    """Every epoch that a job of the group has still to train, all of them in each call: the
    histories, checkpoints and metrics are each job's own."""
    settings = jobs[0].setup.settings
    diagnostics = {}  # a job's diagnostics: its own model, on the group's fixed batch
    for epoch in range(min(job.history.epoch for job in jobs) + 1, settings.epochs + 1):
        for job in jobs:
            if job.training and job.history.epoch == epoch - 1 and job.history.stop_reason(job.setup.settings):
                with _as_job(job.index):
                    log.info("stopped at epoch %d: %s", job.history.epoch, job.history.stop_reason(job.setup.settings))
        training = [job.training and job.history.epoch == epoch - 1 and not job.history.stop_reason(job.setup.settings)
                    for job in jobs]
        if not any(training):
            break
        begun = time.perf_counter()
        keys = _stack([jax.random.fold_in(job.setup.keys.train, epoch) for job in jobs])
        states, step_metrics = train_group(states, splits["train"], keys, numbers, jnp.asarray(training))
        step_metrics = jax.device_get(step_metrics)  # the epoch's one host transfer, for every job
        seconds = time.perf_counter() - begun
        keys = _stack([jax.random.fold_in(job.setup.keys.validation, epoch) for job in jobs])
        validation = jax.device_get(evaluate_group(states, splits["validation"], keys, numbers))
        for job, trained in zip(jobs, training):
            if not trained:
                continue
            setup = job.setup
            state = _job_of(states, job.lane)
            diagnose = None
            if setup.settings.diagnostics_every:
                if job.index not in diagnostics:
                    batch = loop.fixed_diagnostics_batch(splits, setup.keys, setup.settings, setup.data.dynamic)
                    diagnostics[job.index] = (steps.make_diagnostics(setup.model, setup.settings.diagnostics_estimates,
                                                                     setup.devices), batch)
                make, batch = diagnostics[job.index]
                diagnose = lambda: make(state, batch, splits["validation"],
                                        jax.random.fold_in(setup.keys.diagnostics, epoch))
            with _as_job(job.index):
                try:
                    loop.record_epoch(setup.model, epoch, _job_of(step_metrics, job.lane), seconds,
                                      _job_of(validation, job.lane), state, job.history, setup.settings,
                                      job.checkpoints, job.metrics_log, job.record, diagnose)
                except Exception as error:  # a NaN: this job ends, with its own FAILED
                    job.fail(error)
        values = [job.history.best_value for job, trained in zip(jobs, training) if trained and job.training]
        log.info("epoch %d/%d: %d of %d jobs trained in %.1f s%s", epoch, settings.epochs, sum(training), len(jobs),
                 seconds, f", best validation {jobs[0].setup.model.selection_metric} {min(values):.3f}" if values else "")
    return states

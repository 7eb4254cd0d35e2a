"""`dgm <command> ...`: a thin dispatcher in front of the commands.

Hydra has no subcommands, so `dgm train ...` hands everything after `train` to the `train` Hydra
app unchanged: overrides, `-m`, `--cfg job`, `--help`, `--info`, `--config-path`, `--config-name`.
The other commands work on run directories that `dgm train` made.
"""

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import shlex
import sys
import traceback
from importlib import resources
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dgm_cli import interrupts, settings
from dgm_cli.interrupts import Terminated
from dgm_cli.errors import DgmError, install_command

log = logging.getLogger(__name__)
CONFIGS = "pkg://dgm_cli.configs"
_failed_jobs: list[str] = []  # filled by FailedJobs at the end of a sweep, read by `main`
trained_runs: list[Path] = []  # the run directory of every job that trained, read by `dgm_cli.train`
# The run that `resume=RUN` names, put here by `_train_arguments`, read by `_train_job`: by then
# it is only a hydra.run.dir, as in a command aimed at the run, and only one that asked to resume
# may take the run on to more epochs.
_resumed_runs: list[Path] = []
# The run a job is training, and the sweep directory when the same command goes on with the
# sweep, for the line that an interrupted `dgm train` ends with; the sweeps that ended.
_in_progress: list[tuple[Path, Path | None]] = []
_command: list[str] = []  # the arguments of `dgm train`, for that line
_ended_sweeps: list[Path] = []
# For `dgm rerun RUN`: RUN's own overrides, which the new run's overrides.yaml records before its
# own, so that it says what it ran with (its config came from RUN's, not from the defaults).
_replayed: list[str] = []


class _Rejected(Exception):
    """A new run refused before its first epoch: a bad setting or data, said in one line."""


@hydra.main(config_path=CONFIGS, config_name="train", version_base="1.3")
def train_app(cfg) -> float | None:
    """One job. -> its best validation value (lower is better), what a sweeper such as Optuna's
    minimises; None for a job of a sweep that failed or was refused."""
    summary = _train_job(cfg)
    if summary is None:
        return None  # a failed job: Optuna's sweeper records a failed trial (see `run_train_app`)
    return _best_validation(summary)


def _train_job(cfg) -> dict | None:
    """-> the run's summary, or None if the job failed in a sweep (which goes on)."""
    from dgm_cli import loop, rundir  # heavy imports (JAX, TFDS) only once a job runs

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    _quiet_libraries()  # again: Hydra has just configured logging for the job
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    if not _writes_the_run(cfg):  # another host's process of a multi-host run: process 0 writes
        _stop_logging_to_files()
        return loop.run(cfg, run_dir)
    new = not (run_dir / rundir.SAVED_CONFIG).is_file()
    recorded = _merged(_replayed, hydra_cfg.overrides.task) if _replayed else None
    try:
        with rundir.claim_for_training(run_dir, cfg, hydra_cfg, _is_resumed(run_dir), recorded) as finished:
            trained_runs.append(run_dir)
            if finished:
                print(f"dgm: {run_dir} has finished already; nothing to do")
                return finished
            # Hydra's basic sweeper numbers the jobs alike every time: the same command with
            # its sweep directory finds the finished jobs finished and resumes this one.
            goes_on = sweeping and hydra_cfg.sweeper._target_.endswith(".BasicSweeper")
            _in_progress[:] = [(run_dir, Path(hydra_cfg.sweep.dir) if goes_on else None)]
            summary = _train_or_record_failure(loop, cfg, run_dir, sweeping, new)
            _in_progress.clear()
            return summary
    except _Rejected as rejected:  # its lock released: what dgm made of the run goes
        rundir.remove_unstarted(run_dir)
        raise SystemExit(f"dgm: error: {rejected}") from None
    except rundir.RunRefused as error:  # the run stays exactly as it was: no FAILED, nothing logged
        if not sweeping:
            raise SystemExit(f"dgm: error: {error}") from None
        print(f"dgm: error: this job was refused: {error}", file=sys.stderr)
        _failed_jobs.append(f"{run_dir}: {error}")
        return None


def _is_resumed(run_dir: Path) -> bool:
    return any(run_dir.resolve() == run.resolve() for run in _resumed_runs)


def _merged(earlier: list[str], later: list[str]) -> list[str]:
    """The overrides `earlier` then `later`, less those of `earlier` whose key `later` sets again."""
    keys = {override.lstrip("+~").split("=", 1)[0] for override in later}
    return [o for o in earlier if o.lstrip("+~").split("=", 1)[0] not in keys] + list(later)


def _train_or_record_failure(loop, cfg, run_dir: Path, sweeping: bool, new: bool):
    """The loop's summary; a failure is kept in FAILED, except that a new run (`new`) of a
    single command refused before its first epoch leaves no run directory: the terminal has
    the line, and `dgm report` no row of a run that never trained. A sweep keeps each job."""
    (run_dir / "FAILED").unlink(missing_ok=True)  # a failure this run may now make good
    try:
        return loop.run(cfg, run_dir)
    except Exception as error:
        message, expected = one_line(error), _expected(error)
        if expected and new and not sweeping and not (run_dir / "metrics.jsonl").exists():
            raise _Rejected(message) from None  # metrics.jsonl: the first epoch had begun
        _record_failure(run_dir, error)
        if sweeping:  # record it and let the sweep go on
            log.error("this job failed: %s", message)
            return None
        _log_to_files(f"dgm: error: {message}")  # the terminal gets it once, from `main`
        if expected:
            raise SystemExit(f"dgm: error: {message}") from None
        raise


def _expected(error: Exception) -> bool:
    return isinstance(error, (DgmError, OmegaConfBaseException))  # the latter: a bad ${...}


def _record_failure(run_dir: Path, error: Exception) -> None:
    """RUN/FAILED: the reason on the first line; below it, for a fault of dgm or a library, where it arose."""
    where = "" if _expected(error) else "".join(traceback.format_exception(error))
    (run_dir / "FAILED").write_text(one_line(error) + "\n" + where)


def train_group(jobs: list) -> list[float | None]:
    """The jobs [(config, hydra config)] of a sweep that `dgm_cli.packing` trains as one group
    (`hydra/launcher=packed`), each claimed as `dgm train` claims a job's run. -> per job its best
    validation value, or None for a job that failed or was refused (the others go on)."""
    from dgm_cli import packing, rundir  # heavy imports (JAX, TFDS) only once a job runs

    _quiet_libraries()
    values: list[float | None] = [None] * len(jobs)
    with contextlib.ExitStack() as claims:
        training = []
        for index, (cfg, hydra_cfg) in enumerate(jobs):
            run_dir = Path(hydra_cfg.runtime.output_dir)
            try:
                finished = claims.enter_context(rundir.claim_for_training(run_dir, cfg, hydra_cfg))
            except rundir.RunRefused as error:  # the run stays exactly as it was
                print(f"dgm: error: this job was refused: {error}", file=sys.stderr)
                _failed_jobs.append(f"{run_dir}: {error}")
                continue
            trained_runs.append(run_dir)
            if finished:
                print(f"dgm: {run_dir} has finished already; nothing to do")
                values[index] = _best_validation(finished)
                continue
            (run_dir / "FAILED").unlink(missing_ok=True)  # a failure this run may now make good
            training.append(index)
        if not training:
            return values
        run_dirs = [Path(jobs[index][1].runtime.output_dir) for index in training]
        hydra_cfg = jobs[0][1]
        goes_on = hydra_cfg.sweeper._target_.endswith(".BasicSweeper")  # as for a job alone: see _train_job
        _in_progress[:] = [(run_dirs[0], Path(hydra_cfg.sweep.dir) if goes_on else None)]
        try:
            outcomes = packing.train([jobs[index][0] for index in training], run_dirs, hydra_cfg.job_logging)
        except Exception as error:  # a fault of the group's own program: every job of it failed
            log.error("the packed group failed: %s", one_line(error))
            outcomes = [error] * len(training)
        _in_progress.clear()
        for index, run_dir, outcome in zip(training, run_dirs, outcomes):
            if isinstance(outcome, Exception):
                _record_failure(run_dir, outcome)
            else:
                values[index] = _best_validation(outcome)
    return values


def _best_validation(summary: dict) -> float:
    """What a sweeper such as Optuna's minimises: the run's best validation value."""
    return next(value for name, value in summary.items() if name.startswith("best_validation_"))


def _writes_the_run(cfg) -> bool:
    """Of the processes of a multi-host run, process 0 alone writes the run directory."""
    return not cfg.distributed.coordinator_address or cfg.distributed.process_id == 0


def _stop_logging_to_files() -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()


def _log_to_files(message: str) -> None:
    record = logging.LogRecord(__name__, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _quiet_libraries() -> None:
    """Orbax and TFDS log through absl: every file written at INFO, advice at WARNING, and a
    damaged checkpoint at ERROR, which dgm reports itself, in one line."""
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("jax").setLevel(logging.WARNING)


class FailedJobs(Callback):
    """At the end of a sweep, collects the jobs that failed, so that `main` can say so."""

    def on_multirun_end(self, config, **kwargs) -> None:
        failed = [f"{marker.parent}: {marker.read_text().splitlines()[0]}"
                  for marker in sorted(Path(config.hydra.sweep.dir).glob("*/FAILED"))]
        _ended_sweeps.append(Path(config.hydra.sweep.dir))
        if "optuna" in str(config.hydra.sweeper.get("_target_", "")):
            # A search expects some trials to fail (a learning rate too high diverges): Optuna
            # has counted them as failed trials, and the search has its answer.
            for line in failed:
                print(f"dgm: a failed trial: {line}", file=sys.stderr)
            return
        _failed_jobs.extend(failed)


def train(args: list[str], replayed: list[str] = ()) -> None:
    """`dgm train ARGS`; `replayed`: for dgm rerun, the overrides of the run whose saved config it trains."""
    _command[:] = args
    run_train_app(args, replayed)
    for sweep in _ended_sweeps:
        jobs = len({path.parent for path in sweep.glob("*/.hydra")})
        print(f"dgm: the sweep's {jobs} run directories are in {sweep}; tabulate them with: "
              f"dgm report {shlex.quote(str(sweep))}")
    if _failed_jobs:
        raise DgmError(f"{len(_failed_jobs)} job(s) of the sweep failed, the others ran: " + "; ".join(_failed_jobs))


def _show_own_plugins_to_hydra() -> None:
    """dgm's launcher (`hydra/launcher=packed`, in hydra_plugins/dgm_launcher) in the namespace that
    Hydra scans for plugins: an editable install's import finder maps it for `import`, but not
    for the scan, which lists directories."""
    import hydra_plugins

    where = str(Path(importlib.util.find_spec("hydra_plugins.dgm_launcher").origin).parents[1])
    if where not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(where)


def run_train_app(args: list[str], replayed: list[str] = ()) -> None:
    """The `train` Hydra app on `args`, as the command line gives them."""
    _show_own_plugins_to_hydra()
    _replayed[:] = replayed
    _failed_jobs.clear()
    trained_runs.clear()
    _resumed_runs.clear()
    _in_progress.clear()
    _ended_sweeps.clear()
    args = _train_arguments(args)
    settings.check(args)  # a key the config lacks, even with +, is refused here, not ignored
    if "--version" in args:
        print(version_line())
        return
    if "--help" in args or "-h" in args:
        text = settings.describe(args)
        if text is not None:  # else configs of the user's own: Hydra's help
            print(text, end="")
            return
    if "hydra/sweeper=optuna" in args and not any(arg.startswith("hydra.sweeper.max_failure_rate=") for arg in args):
        # Optuna's sweeper counts a job that returns no value as a failed trial, and by default
        # stops the search at the first: a search expects some (a learning rate that diverges).
        args.append("hydra.sweeper.max_failure_rate=1.0")
    # Hydra's parser takes the overrides in one run after the flags (`--cfg job`). dgm writes
    # .hydra/ itself, once the run directory is known to be free and its own: said here, not in
    # train.yaml, because a resumed or rerun run's primary config is its own saved one.
    is_override = [not arg.startswith("-") and ("=" in arg or arg.startswith("~")) for arg in args]
    sys.argv = ["dgm train", *(arg for arg, override in zip(args, is_override) if not override),
                *(arg for arg, override in zip(args, is_override) if override), "hydra.output_subdir=null"]
    train_app()


# What may differ when a run goes on: where and how it runs and what it measures on the side,
# not what it trains.
RESUME_OVERRIDES = ("distributed.", "trainer.progress=", "cache_dir=", "trainer.diagnostics_", "logger.",
                    "trainer.pack_size=")


def _train_arguments(args: list[str]) -> list[str]:
    """The user's arguments for Hydra: `resume=RUN` spelled out, --config-path made absolute."""
    resume = [arg for arg in args if arg.startswith("resume=")]
    if resume:
        if len(resume) > 1:
            raise DgmError(f"resume=RUN takes one run, not {' '.join(resume)}")
        from dgm_cli.runs import run_directory

        run = run_directory(resume[0].split("=", 1)[1]).absolute()
        others = [arg for arg in args if arg not in resume]
        settings.check(["--config-path", str(run / ".hydra"), "--config-name", "config", *others])
        refused = [arg for arg in others if not arg.startswith((*RESUME_OVERRIDES, "trainer.epochs="))]
        if refused:
            raise DgmError(f"resume=RUN takes no {' '.join(refused)}: a resumed run keeps its own config "
                           f"(it takes only {', '.join(a + '…' for a in RESUME_OVERRIDES)}, and trainer.epochs=N "
                           f"to go on to N epochs)")
        if (run / "summary.json").is_file() and not any(arg.startswith("trainer.epochs=") for arg in others):
            print(f"dgm: {run} has finished; nothing to resume (trainer.epochs=N takes it on to N epochs)")
            sys.exit(0)
        _resumed_runs.append(run)
        return [*_from_saved_config(run), f"hydra.run.dir='{run}'", *others]
    return _absolute_config_path(args)


def _absolute_config_path(args: list[str]) -> list[str]:
    """Hydra resolves a relative --config-path against its own source file; users mean their
    working directory."""
    args = list(args)
    for index, arg in enumerate(args):
        for flag in ("--config-path", "-cp"):
            if arg == flag and index + 1 < len(args) and "://" not in args[index + 1]:
                args[index + 1] = str(Path(args[index + 1]).absolute())
            elif arg.startswith(flag + "=") and "://" not in arg:
                args[index] = f"{flag}={Path(arg.split('=', 1)[1]).absolute()}"
    return args


RERUN_USAGE = """usage: dgm rerun RUN [overrides]

Trains RUN's saved config (RUN/.hydra/config.yaml) again, in a new run directory: without
overrides the run exactly (on the same machine and library versions, every metric the same),
with KEY=VALUE overrides those settings changed. A config group (optimizer=sgd) replays the
run's own overrides on the package's configs, provided they still compose its saved config.
"""


def _wants_help(args: list[str]) -> bool:
    return "--help" in args or "-h" in args


def rerun(args: list[str]) -> None:
    if _wants_help(args):
        print(RERUN_USAGE, end="")
        return
    if not args or args[0].startswith("-"):
        raise DgmError(RERUN_USAGE.splitlines()[0])
    from dgm_cli.runs import run_directory

    run, overrides = run_directory(args[0]), args[1:]
    new_run_dir = f"hydra.run.dir={_default_run_dir()}"  # the saved config has no hydra node
    groups = [override for override in overrides if settings.is_group(override.lstrip("+~").split("=", 1)[0])]
    saved_overrides = list(OmegaConf.load(run / ".hydra" / "overrides.yaml"))
    if not groups:  # the saved config itself: the run exactly, whatever the package's configs say today
        train([*_from_saved_config(run), new_run_dir, *overrides], replayed=saved_overrides)
        return
    # A config group is chosen in a defaults list, which only the package's configs have: replay
    # the run's own overrides on them, provided that they still compose the run's saved config.
    from hydra import compose, initialize_config_module

    from dgm_cli import rundir

    with initialize_config_module("dgm_cli.configs", version_base="1.3"):
        composed = compose("train", overrides=saved_overrides)
    changed = rundir.differences(rundir.training_config(rundir.saved_config(run)), rundir.training_config(composed))
    if changed:
        raise DgmError(f"dgm rerun cannot apply {' '.join(groups)}: {run}'s overrides no longer compose its saved "
                       f"config ({rundir.brief(changed)}); start it afresh with dgm train {' '.join(saved_overrides)} "
                       f"{' '.join(overrides)}")
    train([new_run_dir, *saved_overrides, *overrides])


def _train_yaml_hydra() -> dict:
    """The hydra node of train.yaml, unresolved (${now:…} stays)."""
    return OmegaConf.to_container(OmegaConf.load(resources.files("dgm_cli.configs") / "train.yaml"))["hydra"]


def _default_run_dir() -> str:
    return _train_yaml_hydra()["run"]["dir"]


def _from_saved_config(run: Path) -> list[str]:
    """Hydra's arguments to compose a run's own saved config, which has no hydra node: with the
    job name and log format of train.yaml, so that a resumed run's train.log reads as one."""
    formatter = _train_yaml_hydra()["job_logging"]["formatters"]["simple"]
    return ["--config-path", str(run / ".hydra"), "--config-name", "config", "hydra.job.name=train",
            *(f"++hydra.job_logging.formatters.simple.{key}='{value}'" for key, value in formatter.items())]


@contextlib.contextmanager
def _logging_to_terminal():
    """For the commands that are no Hydra app (dgm eval, dgm sample): their log on stderr in
    train.log's format, so that a test pass reports its progress as a training's does. It is
    the root logger's one handler meanwhile, as Hydra's are in a training: absl, which Orbax
    logs through, gives the root a handler of Python's default format when it first logs."""
    formatter = _train_yaml_hydra()["job_logging"]["formatters"]["simple"]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(formatter["format"], formatter["datefmt"]))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def evaluate(args: list[str]) -> None:
    from dgm_cli import runs

    with _logging_to_terminal():
        runs.evaluate(args)


def sample(args: list[str]) -> None:
    from dgm_cli import runs

    with _logging_to_terminal():
        runs.sample(args)


REPORT_USAGE = """usage: dgm report DIR [--format markdown|latex] (DIR: a run directory, or a folder of them such as a sweep's)

Tabulates the runs under DIR: one row per data set and configuration (the overrides that set it
apart), the finished runs of several seeds aggregated with their spread, sorted by test NLL, each
row against the best one measured on the same images. Prints the table and writes DIR/report.md
(or report.tex), DIR/report.csv and DIR/curves.png, with convergence.png and gradients.png where
the runs have a k-curve and gradient diagnostics.
"""


def gaps(args: list[str]) -> None:
    from dgm_cli import runs

    with _logging_to_terminal():
        runs.gaps(args)


def report(args: list[str]) -> None:
    if _wants_help(args):
        print(REPORT_USAGE, end="")
        return
    format = "markdown"
    if len(args) == 3 and args[1] == "--format" or len(args) == 2 and args[1].startswith("--format="):
        format = args[2] if len(args) == 3 else args[1].split("=", 1)[1]
        args = args[:1]
    if len(args) != 1 or args[0].startswith("-") or format not in ("markdown", "latex"):
        raise DgmError(REPORT_USAGE.splitlines()[0])
    from dgm_cli.report import report as make_report

    text, written, unwritable = make_report(Path(args[0]), format)
    print(text, end="")
    if unwritable:
        print(f"dgm: the table is above; no report files written into {args[0]} ({unwritable})", file=sys.stderr)
    else:
        print(f"written: {Path(args[0]) / written[0]}, {', '.join(written[1:])}")


COMMANDS = {
    "train": (train, "train a model: dgm train [overrides]; `dgm train --help` lists the options"),
    "rerun": (rerun, "run a run's saved config again: dgm rerun RUN [overrides]"),
    "eval": (evaluate, "measure a run's best model on the test set again: dgm eval RUN [eval.num_samples=N]"),
    "gaps": (gaps, "split a run's likelihood loss into approximation and amortisation gaps: dgm gaps RUN [images=1000]"),
    "sample": (sample, "draw from a run's best model into a PNG grid: dgm sample RUN [n=64] [seed=0]"),
    "report": (report, "tabulate the runs under a directory (a run, a sweep): dgm report DIR [--format latex]"),
}

USAGE = """usage: dgm <command> [arguments]

dgm is an experiment runner for deep generative models of binary data.

commands:
{commands}

examples:
  dgm train model=vae
  dgm train model=wakesleep dataset=digits trainer.epochs=20
  dgm train -m optimizer.lr=1e-3,3e-4 seed=0,1      # a sweep: one run directory per job
  dgm train resume=outputs/2026-11-24/09-30-00.117305-vae  # go on where a killed run stopped
  dgm report outputs/multirun/2026-11-24/10-00-00.512344

`dgm COMMAND --help` says more about each; `dgm --version` the installed version.
"""


def version_line() -> str:
    """"dgm 0.1.0 (jax 0.10.2, flax 0.12.1, optax …, hydra-core 1.3.8)": what a run's figures depend on."""
    import dgm_cli

    versions = []
    for package in ("jax", "flax", "optax", "orbax-checkpoint", "hydra-core"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return f"dgm {dgm_cli.__version__} ({', '.join(versions)})"


def _usage() -> str:
    commands = "\n".join(f"  {name:<8}{text}" for name, (_, text) in COMMANDS.items())
    return USAGE.format(commands=commands)


# The config groups whose options come with a Hydra plugin, and the extra of dgm that installs it.
PLUGINS = {"hydra/sweeper/optuna": "optuna", "hydra/launcher/submitit_local": "slurm",
           "hydra/launcher/submitit_slurm": "slurm", "hydra/launcher/packed_submitit_local": "slurm",
           "hydra/launcher/packed_submitit_slurm": "slurm"}


def one_line(error: Exception) -> str:
    if isinstance(error, MissingConfigException) and error.options is not None:
        group, _, name = (error.missing_cfg_file or "").rpartition("/")
        if error.missing_cfg_file in PLUGINS:
            return f"{group}={name} needs its Hydra plugin: {install_command(PLUGINS[error.missing_cfg_file])}"
        return f"unknown {group} {name!r}; choose from: {', '.join(error.options)}"
    text = str(error).split("Config search path:")[0]  # Hydra appends its search path
    if error.__cause__ is not None:
        text += "\n" + str(error.__cause__)
    lines = []
    for line in text.splitlines():
        line = line.strip().rstrip(".")
        if line and not line.startswith(("full_key:", "object_type=")) and line not in lines:
            lines.append(line)
    return "; ".join(lines) or type(error).__name__


def _interrupted(command: str, interrupt: KeyboardInterrupt) -> str:
    """What an interrupted command leaves: the run, its checkpoints, the command that goes on."""
    how = "terminated" if isinstance(interrupt, Terminated) else "interrupted"
    if command not in ("train", "rerun"):
        return f"{how}; nothing of this dgm {command} was kept, and the runs are as they were"
    if not _in_progress:
        return f"{how} before any run began to train"
    run, sweep = _in_progress[-1]
    epochs = [int(path.name) for path in (run / "checkpoints").glob("*") if path.name.isdigit()]
    kept = f"keeps its checkpoint of epoch {max(epochs)}" if epochs else "had finished no epoch"
    line = f"{how}; {run} {kept}; go on with: dgm train resume={shlex.quote(str(run))}"
    if sweep is not None:
        others = [arg for arg in _command if not arg.startswith("hydra.sweep.dir=")]
        line += (f"; the whole sweep goes on with: dgm train {' '.join(map(shlex.quote, others))} "
                 f"{shlex.quote(f'hydra.sweep.dir={sweep}')}")
    return line


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(), end="")
        sys.exit(0 if argv else 2)
    if argv[0] in ("--version", "-V"):
        print(version_line())
        sys.exit(0)
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.exit(f"dgm: error: unknown command {command!r}; choose from: {', '.join(COMMANDS)}")

    # Hydra prints its own multi-line report of a bad config unless asked to raise; we raise and
    # turn it into one line, keeping the full traceback for those who set HYDRA_FULL_ERROR=1.
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    interrupts.install()
    logging.raiseExceptions = False  # a closed pipe (`| head`) must not make every log line a traceback
    _quiet_libraries()
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        COMMANDS[command][0](args)
    except (HydraException, OmegaConfBaseException, DgmError) as error:
        if wants_traceback:
            raise
        sys.exit(f"dgm: error: {one_line(error)}")
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or `kill` (SIGTERM: Terminated)
        line = f"dgm: {_interrupted(command, interrupt)}"
        _log_to_files(line)
        print(line, file=sys.stderr)
        sys.exit(143 if isinstance(interrupt, Terminated) else 130)
    except BrokenPipeError:  # `dgm … | head` has read all it wants: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(141)
    except Exception as error:  # not a bad input that dgm knows: still one line, and where to look
        if wants_traceback:
            raise
        sys.exit(f"dgm: error: {type(error).__name__}: {one_line(error)} (HYDRA_FULL_ERROR=1 shows the traceback)")

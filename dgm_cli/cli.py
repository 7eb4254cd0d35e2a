"""`dgm <command> ...`: a thin dispatcher in front of the commands.

Hydra has no subcommands, so `dgm train ...` hands everything after `train` to the `train` Hydra
app unchanged: overrides, `-m`, `--cfg job`, `--help`, `--info`, `--config-path`, `--config-name`.
The other commands work on run directories that `dgm train` made.
"""

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

from dgm_cli.errors import DgmError

log = logging.getLogger(__name__)
CONFIGS = "pkg://dgm_cli.configs"
_failed_jobs: list[str] = []  # filled by FailedJobs at the end of a sweep, read by `main`


@hydra.main(config_path=CONFIGS, config_name="train", version_base="1.3")
def train_app(cfg) -> dict | None:
    from dgm_cli import train  # heavy imports (JAX, TFDS) only once a job runs

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    _quiet_libraries()  # again: Hydra has just configured logging for the job
    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return train.run(cfg, run_dir)
    except Exception as error:
        message = _one_line(error)
        expected = isinstance(error, (DgmError, OmegaConfBaseException))  # the latter: a bad ${...}
        # The reason on the first line; below it, for a fault of dgm or a library, where it arose.
        (run_dir / "FAILED").write_text(message + "\n" + ("" if expected else traceback.format_exc()))
        if sweeping:  # record it and let the sweep go on
            log.error("this job failed: %s", message)
            return None
        if expected:
            raise SystemExit(f"dgm: error: {message}") from None
        raise


def _quiet_libraries() -> None:
    """Orbax and TFDS log through absl: every file written at INFO, advice at WARNING, and a
    damaged checkpoint at ERROR, which dgm reports itself, in one line."""
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("jax").setLevel(logging.WARNING)


class FailedJobs(Callback):
    """At the end of a sweep, collects the jobs that failed, so that `main` can say so."""

    def on_multirun_end(self, config, **kwargs) -> None:
        for marker in sorted(Path(config.hydra.sweep.dir).glob("*/FAILED")):
            _failed_jobs.append(f"{marker.parent}: {marker.read_text().splitlines()[0]}")


def train(args: list[str]) -> None:
    sys.argv = ["dgm train", *_train_arguments(args)]
    train_app()
    if _failed_jobs:
        raise DgmError(f"{len(_failed_jobs)} job(s) of the sweep failed, the others ran: " + "; ".join(_failed_jobs))


def _train_arguments(args: list[str]) -> list[str]:
    """The user's arguments for Hydra: `resume=RUN` spelled out, --config-path made absolute."""
    resume = [arg for arg in args if arg.startswith("resume=")]
    if resume:
        if len(args) > 1:
            raise DgmError("resume=RUN takes no other arguments: a resumed run keeps its own config")
        from dgm_cli.runs import run_directory

        run = run_directory(resume[0].split("=", 1)[1]).absolute()
        if (run / "summary.json").is_file():
            print(f"dgm: {run} has finished; nothing to resume")
            sys.exit(0)
        # The run's own config, its own directory, and its .hydra/ left as it was.
        return ["--config-path", str(run / ".hydra"), "--config-name", "config",
                f"hydra.run.dir='{run}'", "hydra.output_subdir=null", "hydra.job.name=train"]
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


def rerun(args: list[str]) -> None:
    if not args or args[0].startswith("-"):
        raise DgmError("usage: dgm rerun RUN [overrides]")
    from dgm_cli.runs import run_directory

    run = run_directory(args[0])
    train(["--config-path", str(run / ".hydra"), "--config-name", "config", "hydra.job.name=train",
           "hydra.run.dir=outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}-${model.name}", *args[1:]])


def evaluate(args: list[str]) -> None:
    from dgm_cli import runs

    runs.evaluate(args)


def sample(args: list[str]) -> None:
    from dgm_cli import runs

    runs.sample(args)


def report(args: list[str]) -> None:
    if len(args) != 1 or args[0].startswith("-"):
        raise DgmError("usage: dgm report DIR (a run directory, or a folder of them such as a sweep's)")
    from dgm_cli.report import report as make_report

    print(make_report(Path(args[0])), end="")
    print(f"written: {Path(args[0]) / 'report.md'}, report.csv, curves.png")


COMMANDS = {
    "train": (train, "train a model: dgm train [overrides]; `dgm train --help` lists the options"),
    "rerun": (rerun, "run a run's saved config again: dgm rerun RUN [overrides]"),
    "eval": (evaluate, "measure a run's best model on the test set again: dgm eval RUN [eval.num_samples=N]"),
    "sample": (sample, "draw from a run's best model into a PNG grid: dgm sample RUN [n=64] [seed=0]"),
    "report": (report, "tabulate the runs under a directory (a run, a sweep): dgm report DIR"),
}

USAGE = """usage: dgm <command> [arguments]

dgm is an experiment runner for deep generative models of binary data.

commands:
{commands}

examples:
  dgm train model=vae
  dgm train model=wakesleep dataset=digits trainer.epochs=20
  dgm train -m optimizer.lr=1e-3,3e-4 seed=0,1      # a sweep: one run directory per job
  dgm train resume=outputs/2026-11-24/09-30-00-vae  # go on where a killed run stopped
  dgm report outputs/multirun/2026-11-24/10-00-00
"""


def _usage() -> str:
    commands = "\n".join(f"  {name:<8}{text}" for name, (_, text) in COMMANDS.items())
    return USAGE.format(commands=commands)


def _one_line(error: Exception) -> str:
    if isinstance(error, MissingConfigException) and error.options is not None:
        group, _, name = (error.missing_cfg_file or "").rpartition("/")
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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(), end="")
        sys.exit(0 if argv else 2)
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.exit(f"dgm: error: unknown command {command!r}; choose from: {', '.join(COMMANDS)}")

    # Hydra prints its own multi-line report of a bad config unless asked to raise; we raise and
    # turn it into one line, keeping the full traceback for those who set HYDRA_FULL_ERROR=1.
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    _quiet_libraries()
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        COMMANDS[command][0](args)
    except (HydraException, OmegaConfBaseException, DgmError) as error:
        if wants_traceback:
            raise
        sys.exit(f"dgm: error: {_one_line(error)}")
    except KeyboardInterrupt:
        print("dgm: interrupted; the checkpoints written so far are kept", file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # not a bad input that dgm knows: still one line, and where to look
        if wants_traceback:
            raise
        sys.exit(f"dgm: error: {type(error).__name__}: {_one_line(error)} (HYDRA_FULL_ERROR=1 shows the traceback)")

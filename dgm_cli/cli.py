"""`dgm <command> [hydra overrides]`: a thin dispatcher in front of one Hydra app per command.

Hydra has no subcommands, so `dgm train ...` hands everything after `train` to the `train` app
unchanged: overrides, `-m`, `--cfg job`, `--help`, `--info`, `--config-path`, `--config-name`.
"""

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

from dgm_cli.errors import DgmError

CONFIGS = "pkg://dgm_cli.configs"


@hydra.main(config_path=CONFIGS, config_name="train", version_base="1.3")
def train(cfg) -> dict:
    from dgm_cli import train as training  # heavy imports (JAX, TFDS) only once a job runs

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    for noisy in ("absl", "jax"):  # Orbax (through absl) reports every file it writes at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return training.run(cfg, run_dir)
    except (DgmError, OmegaConfBaseException) as error:  # the latter: a bad ${...} in the config
        message = _one_line(error)
        (run_dir / "FAILED").write_text(message + "\n")
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records this job as failed and goes on with the others
        raise SystemExit(f"dgm: error: {message}") from None


COMMANDS = {"train": (train, "train a model; `dgm train --help` shows its options")}

USAGE = """usage: dgm <command> [hydra overrides and flags]

dgm is an experiment runner for deep generative models of binary data.

commands:
{commands}

examples:
  dgm train model=vae
  dgm train model=vae dataset=digits trainer.epochs=20
  dgm train -m optimizer.lr=1e-3,3e-4 seed=0,1
"""


def _usage() -> str:
    commands = "\n".join(f"  {name:<8}{text}" for name, (_, text) in COMMANDS.items())
    return USAGE.format(commands=commands)


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


def _one_line(error: Exception) -> str:
    if isinstance(error, MissingConfigException) and error.options is not None:
        group = (error.missing_cfg_file or "").rpartition("/")[0]
        name = (error.missing_cfg_file or "").rpartition("/")[2]
        return f"unknown {group} {name!r}; choose from: {', '.join(error.options)}"
    text = str(error).split("Config search path:")[0]  # Hydra appends its search path
    if error.__cause__ is not None:
        text += "\n" + str(error.__cause__)
    lines = []
    for line in text.splitlines():
        line = line.strip().rstrip(".")
        if line and not line.startswith(("full_key:", "object_type=")) and line not in lines:
            lines.append(line)
    return "; ".join(lines)


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
    os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv = [f"dgm {command}", *_absolute_config_path(args)]
    try:
        COMMANDS[command][0]()
    except (HydraException, OmegaConfBaseException, DgmError) as error:
        if wants_traceback:
            raise
        sys.exit(f"dgm: error: {_one_line(error)}")
    except KeyboardInterrupt:
        print("dgm: interrupted; the checkpoints written so far are kept", file=sys.stderr)
        sys.exit(130)

"""A run directory's guard: one writer at a time, and a saved config that is never overwritten.

Every command that writes into a run (`dgm train`, `dgm eval`, `dgm sample`) first takes an
exclusive lock on it for its whole life. The lock is an `flock` on `RUN/.lock`, which the
kernel releases when its process ends however it ends, so a run killed with `kill -9` never
blocks its own resume. A command aimed at a run that already has a saved config either matches
it (and resumes, or finds it finished) or is refused, before anything in the run is touched:
dgm writes `.hydra/` itself, once, after that check (Hydra is told not to).
"""

import contextlib
import fcntl
import json
import os
import shutil
import time
from importlib import resources
from pathlib import Path

from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from dgm_cli.errors import DgmError
from dgm_cli.metrics import write_atomically
from dgm_cli.optim import SHAPED_BY_LENGTH

LOCK = ".lock"
SAVED_CONFIG = Path(".hydra") / "config.yaml"


class RunRefused(DgmError):
    """A command that must leave the run it is aimed at exactly as it found it."""


@contextlib.contextmanager
def exclusive(run_dir: Path, command: str):
    """Hold the run's lock for the life of the block, or refuse at once naming its holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise RunRefused(f"{run_dir} is in use by {holder}; wait until it ends, "
                             "or choose another run directory") from None
        lock.truncate(0)
        lock.write(f"process {os.getpid()} ({command}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        lock.flush()
        yield  # closing the file releases the lock; the file stays, harmless, for the next holder


def with_current_defaults(cfg):
    """`cfg` with every model, trainer, dataset and eval setting that dgm gained after it was saved, at
    today's default (`configs/model/NAME.yaml`, `configs/trainer/default.yaml`, `configs/dataset/NAME.yaml`,
    the `eval` of `configs/train.yaml`). New settings default to
    what dgm did before they existed, so a run saved earlier reads as what it was, and can still
    be resumed, evaluated and compared. The settings `cfg` has are left as they are."""
    configs = resources.files("dgm_cli.configs")
    defaults = {"model": configs / "model" / f"{cfg.model.name}.yaml", "trainer": configs / "trainer" / "default.yaml",
                "dataset": configs / "dataset" / f"{cfg.dataset.name}.yaml"}
    missing = {}
    for group, path in {**defaults, "eval": configs / "train.yaml"}.items():
        if path.is_file():
            values = OmegaConf.to_container(OmegaConf.load(path))
            values = values["eval"] if group == "eval" else values
            absent = {key: value for key, value in values.items() if key not in cfg[group] and key != "defaults"}
            if absent:
                missing[group] = absent
    if not missing:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.merge_with(missing)
    return cfg


def training_config(cfg) -> dict:
    """What must not change when a run goes on: its resolved config, less what only says where
    and how it runs (the progress bar, the cache, the hosts of a multi-host run, the tracker, the packing
    of a sweep's jobs) and what it measures on the side (the gradient diagnostics, which draw on keys of
    their own)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for name in ("progress", "diagnostics_every", "diagnostics_estimates", "pack_size"):
        config["trainer"].pop(name, None)
    config.pop("cache_dir", None)
    config.pop("distributed", None)
    config.pop("logger", None)
    return config


def _leaves(tree, prefix: str = ""):
    if isinstance(tree, dict) and tree:
        for name, value in tree.items():
            yield from _leaves(value, f"{prefix}{name}.")
    else:
        yield prefix[:-1], tree


def differences(saved: dict, wanted: dict) -> list[str]:
    """`key saved-value in the run, wanted-value here` for every setting that differs."""
    saved, wanted = dict(_leaves(saved)), dict(_leaves(wanted))

    def shown(values, key):
        return json.dumps(values[key]) if key in values else "unset"

    return [f"{key} {shown(saved, key)} in the run, {shown(wanted, key)} here"
            for key in sorted(saved.keys() | wanted.keys())
            if key not in saved or key not in wanted or saved[key] != wanted[key]]


def brief(changed: list[str]) -> str:
    """The first few `differences`, for a one-line message."""
    return "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")


def saved_config(run_dir: Path):
    """The run's saved config (unresolved, as written), or None if it has none."""
    path = run_dir / SAVED_CONFIG
    if not path.is_file():
        return None
    try:
        return with_current_defaults(OmegaConf.load(path))
    except (OmegaConfBaseException, OSError, ValueError) as error:
        raise RunRefused(f"{path} cannot be read ({str(error).splitlines()[0]})") from None


def as_saved(saved: dict, wanted: dict, run_dir: Path) -> dict:
    """`wanted` (a training_config) as the run with the `saved` one reads it: asking for more
    epochs than the run's is asking it to go on, which needs a schedule that does not depend on
    the run's length (or the run would not end as one trained that long from the start)."""
    before, after = saved["trainer"]["epochs"], wanted["trainer"]["epochs"]
    if not (isinstance(before, int) and isinstance(after, int) and after > before):
        return wanted
    schedule = saved["schedule"]["name"]
    if schedule in SHAPED_BY_LENGTH:
        raise RunRefused(f"{run_dir} cannot go on to trainer.epochs={after}: its schedule.name={schedule} is shaped "
                         f"by its {before} epochs, so it would not end as a run of {after} epochs does; train "
                         f"that afresh with `dgm rerun {run_dir} trainer.epochs={after}`")
    return {**wanted, "trainer": {**wanted["trainer"], "epochs": before}}


def check_matches(run_dir: Path, cfg, resumed: bool = False) -> bool:
    """Refuse, naming what differs, unless `cfg` trains what the run's saved config trains, or,
    for `resume=RUN` (`resumed`) alone, the same for more epochs: a command that only names the
    directory must not grow a run by one changed setting. -> whether it goes on to more epochs."""
    saved = saved_config(run_dir)
    if saved is None:
        return False
    try:
        saved, wanted = training_config(saved), training_config(with_current_defaults(cfg))
    except OmegaConfBaseException as error:
        raise RunRefused(f"{run_dir / SAVED_CONFIG} cannot be resolved ({str(error).splitlines()[0]})") from None
    changed = differences(saved, as_saved(saved, wanted, run_dir) if resumed else wanted)
    if changed:
        raise RunRefused(f"{run_dir} holds a run of another config ({brief(changed)}); "
                         f"{_advice(run_dir, saved, wanted, changed)}")
    return wanted["trainer"]["epochs"] != saved["trainer"]["epochs"]


def _advice(run_dir: Path, saved: dict, wanted: dict, changed: list[str]) -> str:
    """How to get what a refused command asked of the run: more epochs only by name."""
    before, epochs = saved["trainer"]["epochs"], wanted["trainer"]["epochs"]
    more = isinstance(before, int) and isinstance(epochs, int) and epochs > before
    if more and len(changed) == 1 and changed[0].startswith("trainer.epochs "):
        return f"take it on to {epochs} epochs with `dgm train resume={run_dir} trainer.epochs={epochs}`"
    return f"go on with it by `dgm train resume={run_dir}`, or choose a new hydra.run.dir"


def _extend(run_dir: Path, cfg) -> None:
    """Make the run one of `cfg`'s epochs: its saved config and overrides say so, and it is no
    longer finished (its test figures stay in evaluations.jsonl; the loop writes a new summary)."""
    epochs = cfg.trainer.epochs
    overrides = [o for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml") if not o.startswith("trainer.epochs=")]
    saved = OmegaConf.load(run_dir / SAVED_CONFIG)
    saved.trainer.epochs = epochs
    write_atomically(run_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml([*overrides, f"trainer.epochs={epochs}"]))
    write_atomically(run_dir / SAVED_CONFIG, OmegaConf.to_yaml(saved))
    (run_dir / "summary.json").unlink(missing_ok=True)


def save_hydra_files(run_dir: Path, cfg, hydra_cfg, overrides: list[str] | None = None) -> None:
    """Write `.hydra/` (config.yaml, hydra.yaml, overrides.yaml) as Hydra would, all at once:
    they appear together under their final name or not at all. `overrides`: what overrides.yaml
    records, if not the job's own (a rerun's: the run's overrides, then its own)."""
    final = run_dir / ".hydra"
    if final.exists():
        return
    staging = run_dir / f".hydra.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    hydra_node = OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg)})
    hydra_node.hydra.output_subdir = ".hydra"  # where its files are, though dgm wrote them
    (staging / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (staging / "hydra.yaml").write_text(OmegaConf.to_yaml(hydra_node))
    (staging / "overrides.yaml").write_text(OmegaConf.to_yaml(hydra_cfg.overrides.task if overrides is None
                                                              else list(overrides)))
    os.rename(staging, final)


def summary(run_dir: Path) -> dict | None:
    """The run's summary.json, which only a finished run has."""
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


@contextlib.contextmanager
def claim_for_training(run_dir: Path, cfg, hydra_cfg, resumed: bool = False, overrides: list[str] | None = None):
    """Lock the run, check that `cfg` is the run's own config (a new run: save it, with
    `overrides` as its overrides.yaml if given), and yield the run's summary if it has finished
    already, else None. `resumed`: the command named the run with `resume=RUN`, and so may take
    it on to more epochs."""
    command = " ".join(["dgm train", *hydra_cfg.overrides.task])
    with exclusive(run_dir, command if len(command) < 200 else command[:197] + "..."):
        if check_matches(run_dir, cfg, resumed):
            _extend(run_dir, cfg)
        save_hydra_files(run_dir, cfg, hydra_cfg, overrides)
        yield summary(run_dir)


def remove_unstarted(run_dir: Path) -> None:
    """Remove what dgm and Hydra made of a new run that never began to train (its saved config,
    lock, log and empty checkpoint folder), then the directory, unless it holds anything else."""
    for name in (".hydra", "checkpoints", LOCK, "train.log", "FAILED"):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: files of the user's own stay, and so does it
        run_dir.rmdir()

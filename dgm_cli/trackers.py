"""The experiment tracker a run also logs to, besides its own metrics.jsonl: `logger=tensorboard`
(the default), `logger=mlflow` or `logger=wandb`. Each receives the config when the run starts,
every metrics record as it is written, and at the end the summary and the pictures.

A resumed run goes on in the same tracker run: MLflow's and W&B's run ids are kept in the run
directory (`.mlflow-run`, `.wandb-run`); TensorBoard drops the events after the checkpoint.
"""

import contextlib
import json
import os
import secrets
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from dgm_cli.errors import DgmError, choice, install_command


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"model": {"name": "vae"}} -> {"model.name": "vae"}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _numbers(values: dict) -> dict:
    return {name: float(value) for name, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def _needs(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError:
        raise DgmError(f"logger={extra} needs its client: {install_command(extra)}") from None


class TensorBoard:
    """Event files in RUN/tensorboard (tensorboardX): scalars as `split/metric`, the config and the
    summary as text, the pictures as images."""

    def __init__(self, settings, run_dir: Path, config: dict, resumed_step: int):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resumed_step + 1)
        if not resumed_step:
            self._writer.add_text("config", "```\n" + OmegaConf.to_yaml(config) + "```", 0)

    def log(self, split: str, epoch: int, step: int, values: dict) -> None:
        for name, value in values.items():
            self._writer.add_scalar(f"{split}/{name}", value, step)

    def finish(self, summary: dict, pictures: dict[str, Path], step: int) -> None:
        self._writer.add_text("summary", "```\n" + json.dumps(summary, indent=2) + "\n```", step)
        from PIL import Image

        for name, path in pictures.items():
            self._writer.add_image(f"samples/{name}", np.asarray(Image.open(path).convert("RGB")), step,
                                   dataformats="HWC")

    def close(self, failed: bool = False) -> None:
        self._writer.close()


class MLflow:
    """A run of MLflow's tracking client in `logger.experiment`, at `logger.tracking_uri` (a
    local file store, ./mlruns, by default): the config as parameters, metrics as `split/metric`
    at the training step, the summary as summary.json and `summary/…` metrics, the pictures as
    artifacts under samples/."""

    def __init__(self, settings, run_dir: Path, config: dict, resumed_step: int):
        _needs("mlflow", "mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = str(settings.tracking_uri)
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps its file store in maintenance and asks for this to use it; a local
            # store with nothing to install or serve is what a laptop or a cluster node wants.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = MlflowClient(uri)
        kept = run_dir / ".mlflow-run"
        if kept.is_file():
            self._run_id = kept.read_text().strip()
            self._client.update_run(self._run_id, status="RUNNING")
            return
        experiment = self._client.get_experiment_by_name(settings.experiment)
        experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(settings.experiment)
        run = self._client.create_run(experiment_id, run_name=run_dir.name, tags={"dgm.run_dir": str(run_dir.absolute())})
        self._run_id = run.info.run_id
        params = [Param(key, str(value)[:6000]) for key, value in _flat(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
            self._client.log_batch(self._run_id, params=params[start:start + 100])
        kept.write_text(self._run_id + "\n")

    def log(self, split: str, epoch: int, step: int, values: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"{split}/{name}", value, now, step) for name, value in _numbers(values).items()]
        self._client.log_batch(self._run_id, metrics=metrics)

    def finish(self, summary: dict, pictures: dict[str, Path], step: int) -> None:
        self._client.log_dict(self._run_id, summary, "summary.json")
        self.log("summary", 0, step, summary)
        for path in pictures.values():
            self._client.log_artifact(self._run_id, str(path), "samples")

    def close(self, failed: bool = False) -> None:
        self._client.set_terminated(self._run_id, "FAILED" if failed else "FINISHED")


class WandB:
    """A W&B run in `logger.project` (`logger.mode=offline` by default: it stays in RUN/wandb until
    `wandb sync`): the config, metrics as `split/metric` against `epoch`, the summary, and the
    pictures as images."""

    def __init__(self, settings, run_dir: Path, config: dict, resumed_step: int):
        wandb = _needs("wandb", "wandb")
        kept = run_dir / ".wandb-run"
        run_id = kept.read_text().strip() if kept.is_file() else secrets.token_hex(4)
        self._run = wandb.init(project=settings.project, entity=settings.entity, mode=settings.mode, dir=str(run_dir),
                               name=run_dir.name, id=run_id, resume="allow", config=config,
                               settings=wandb.Settings(console="off", silent=True))
        self._run.define_metric("*", step_metric="epoch")  # test figures belong to an earlier epoch
        kept.write_text(run_id + "\n")

    def log(self, split: str, epoch: int, step: int, values: dict) -> None:
        self._run.log({**{f"{split}/{name}": value for name, value in _numbers(values).items()}, "epoch": epoch})

    def finish(self, summary: dict, pictures: dict[str, Path], step: int) -> None:
        import wandb

        self._run.summary.update(summary)
        self._run.log({f"samples/{name}": wandb.Image(str(path)) for name, path in pictures.items()})

    def close(self, failed: bool = False) -> None:
        self._run.finish(exit_code=1 if failed else 0)


TRACKERS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


class Off:
    """For the processes of a multi-host run that do not write the run."""

    def log(self, *args) -> None: ...

    def finish(self, *args) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def open_tracker(cfg, run_dir: Path, resumed_step: int, enabled: bool = True):
    """The tracker `cfg.logger` names (TensorBoard for a config saved before there was a choice)."""
    if not enabled:
        return Off()
    settings = cfg.get("logger") or OmegaConf.create({"name": "tensorboard"})
    tracker = choice(settings.name, TRACKERS, "logger")
    config = OmegaConf.to_container(cfg, resolve=True)
    return tracker(settings, run_dir, config, resumed_step)


@contextlib.contextmanager
def tracking(cfg, run_dir: Path, resumed_step: int, enabled: bool = True):
    """The run's tracker for the life of the block, closed as finished, or as failed when the
    block raises (a diverged or interrupted run)."""
    tracker = open_tracker(cfg, run_dir, resumed_step, enabled)
    try:
        yield tracker
    except BaseException:
        tracker.close(failed=True)
        raise
    tracker.close()

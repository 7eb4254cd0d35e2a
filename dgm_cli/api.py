"""dgm from Python, for a notebook: `load_run(RUN)` and `train([...overrides])`.

    import dgm_cli
    run = dgm_cli.train(["model=vae", "dataset=digits", "trainer.epochs=5"])  # as `dgm train …`
    run.summary["test_nll"], run.metrics.query("split == 'validation'")
    run = dgm_cli.load_run("outputs/2026-11-26/10-00-00.000000-vae")
    run.model.log_likelihood(x, num_samples=1000)   # [N] log p(x) in nats
    run.model.sample(16, seed=0), run.model.reconstruct(x)

`train` runs the same Hydra app as the command line, in this process: the same configs, run
directory, files and checks. A bad setting raises `DgmError` with the line `dgm` would print.
"""

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from dgm_cli.errors import DgmError, positive_int


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """A run directory as `dgm train` leaves it, finished or not."""

    path: Path
    config: object  # the run's saved config, an OmegaConf DictConfig

    @property
    def summary(self) -> dict | None:
        """summary.json: the test figures and more; None while the run has not finished."""
        from dgm_cli import rundir

        return rundir.summary(self.path)

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def failure(self) -> str | None:
        """Why the run failed, the first line of its FAILED file; None if it has not failed."""
        marker = self.path / "FAILED"
        return marker.read_text().splitlines()[0] if marker.is_file() else None

    @property
    def metrics(self):
        """metrics.jsonl as a pandas DataFrame: one row per split and epoch (`split`, `epoch`,
        `step` and the metrics, NaN where a split has no such metric)."""
        import pandas as pd

        from dgm_cli import metrics

        return pd.DataFrame(metrics.read_records(self.path / "metrics.jsonl"))

    def images(self, split: str = "test") -> np.ndarray:
        """The run's data set's `split` (train, validation or test): [N, *image shape] uint8 in {0, 1}."""
        from dgm_cli import data, runtime

        if split not in ("train", "validation", "test"):
            raise DgmError(f"unknown split {split!r}; choose from: train, validation, test")
        cache_dir = runtime.configure(self.config)
        loaded = data.load(self.config.dataset, cache_dir and cache_dir / "data")
        return getattr(loaded, split).reshape(-1, *loaded.image_shape)

    @functools.cached_property
    def model(self) -> "TrainedModel":
        """The run's model at its best epoch on validation, the one it tested."""
        from dgm_cli import runs, runtime

        runtime.configure(self.config)
        return TrainedModel(*runs.best_model(self.path, self.config), seed=self.config.seed)

    def __repr__(self) -> str:
        summary = self.summary
        status = f"test_nll {summary['test_nll']:.2f}" if summary else "not finished"
        return f"Run({str(self.path)!r}, model={self.config.model.name}, dataset={self.config.dataset.name}, {status})"


class TrainedModel:
    """A trained model with its parameters, working on NumPy arrays of binary images."""

    def __init__(self, model, state, spec, settings, best_epoch: int, data_fingerprint, *, seed: int):
        from dgm_cli import runtime

        self._model, self._state, self.spec, self._settings = model, state, spec, settings
        self.epoch = best_epoch
        self._seed = seed
        self._devices = runtime.Devices(data_parallel=False)

    def _pixels(self, x) -> np.ndarray:
        """x [N, D] or [N, *image shape] in {0, 1} -> [N, D] uint8."""
        x = np.asarray(x)
        if x.ndim < 2 or int(np.prod(x.shape[1:])) != self.spec.dim:
            raise DgmError(f"expected images of {self.spec.dim} pixels, [N, {self.spec.dim}] or "
                           f"[N, {', '.join(map(str, self.spec.image_shape))}]; got an array of shape {x.shape}")
        x = x.reshape(len(x), -1)
        if not np.isin(x, (0, 1)).all():
            raise DgmError("the models are of binary images: every pixel must be 0 or 1")
        return x.astype(np.uint8)

    def log_likelihood(self, x, num_samples: int | None = None, seed: int | None = None) -> np.ndarray:
        """[N] log p(x) in nats: exact where the family has it, else importance sampled with
        `num_samples` (the run's eval.num_samples by default). With the run's own seed and
        sample count on its test set, these are the numbers behind its test NLL."""
        from dgm_cli import steps
        from dgm_cli.loop import Keys

        num_samples = positive_int(num_samples or self._settings.num_samples, "num_samples")
        key = Keys.from_seed(self._seed if seed is None else seed).test
        return steps.log_likelihoods(self._model, self._state, self._pixels(x), key, num_samples,
                                     self._settings.sample_batch, self._devices, progress=False)["log_p"]

    def sample(self, n: int, seed: int | None = None) -> np.ndarray:
        """[n, *image shape] samples (or their pixel probabilities, for the VAE) in [0, 1]; the
        run's own seed draws the run's samples.png."""
        from dgm_cli.loop import Keys

        key, _ = Keys.from_seed(self._seed if seed is None else seed).picture_keys()
        samples = self._model.sample(self._state, key, positive_int(n, "n"))
        return np.asarray(samples).reshape(-1, *self.spec.image_shape)

    def reconstruct(self, x, seed: int | None = None) -> np.ndarray:
        """[N, *image shape] pixel probabilities of x passed through the inference network and back."""
        import jax.numpy as jnp

        from dgm_cli.loop import Keys

        _, key = Keys.from_seed(self._seed if seed is None else seed).picture_keys()
        x = jnp.asarray(self._pixels(x), jnp.float32)
        return np.asarray(self._model.reconstruct(self._state, x, key)).reshape(-1, *self.spec.image_shape)


def load_run(path) -> Run:
    """The run in directory `path` (made by `dgm train`): its config, summary, metrics and model."""
    from dgm_cli import rundir, runs

    run = runs.run_directory(path)
    return Run(run, rundir.saved_config(run))


def train(overrides: list[str] = ()) -> "Run | list[Run]":
    """`dgm train OVERRIDES…` in this process: the finished run, or with "-m" the sweep's runs
    (those that finished and those that failed, in job order: see `Run.failure`)."""
    from dgm_cli import cli

    if isinstance(overrides, str):
        raise DgmError(f"dgm_cli.train takes a list of overrides, such as [{overrides!r}]")
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises, rather than printing and exiting
    try:
        cli.run_train_app(list(overrides))
    except SystemExit as exit:  # how the Hydra app stops at a bad setting on the command line
        if exit.code in (0, None):
            return None
        raise DgmError(str(exit.code).removeprefix("dgm: error: ")) from None
    except (HydraException, OmegaConfBaseException) as error:  # a bad override, an unknown group
        raise DgmError(cli.one_line(error)) from None
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
    runs = [load_run(path) for path in cli.trained_runs]
    if any(arg in ("-m", "--multirun") for arg in overrides):
        return runs
    return runs[0] if runs else None

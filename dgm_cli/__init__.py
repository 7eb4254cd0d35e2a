"""dgm: a command-line experiment runner for deep generative models of binary data, on JAX.

From Python: `dgm_cli.train([...overrides])` and `dgm_cli.load_run(RUN)` (see `dgm_cli.api`)."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["load_run", "train", "Run", "TrainedModel"]
try:
    __version__ = version("dgm")
except PackageNotFoundError:  # a source tree that pip never installed
    __version__ = "unknown"


def __getattr__(name: str):
    # Imported on first use, so that `dgm --help` does not wait for JAX.
    if name in __all__:
        from dgm_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'dgm_cli' has no attribute {name!r}")

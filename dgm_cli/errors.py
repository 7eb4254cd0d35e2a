"""Errors a user can act on, and the checks that raise them.

A `DgmError` reaches the user as one line on stderr and a non-zero exit, never as a traceback
(see `cli.py`), so its message must say what is wrong and what to do about it.
"""

import math
from importlib.metadata import PackageNotFoundError, requires


class DgmError(Exception):
    """A problem with the user's input or run, reported as one line."""


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DgmError(f"{name} must be a positive integer, got {value!r}")
    return value


def non_negative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DgmError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def integer(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DgmError(f"{name} must be an integer, got {value!r}")
    return value


def positive_ints(values, name: str) -> list[int]:
    """A list of positive integers, such as layer sizes (possibly empty)."""
    if isinstance(values, (str, int, float)) or values is None:
        raise DgmError(f"{name} must be a list of positive integers, such as [400], got {values!r}")
    return [positive_int(value, f"every entry of {name}") for value in values]


def per_job(value) -> bool:
    """A number that differs between the jobs of a packed group (`dgm_cli.packing`): inside the
    group's vmapped program it is a JAX array, each job's value checked as a number before."""
    return hasattr(value, "aval")


def non_negative_float(value, name: str) -> float:
    if per_job(value):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise DgmError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def positive_float(value, name: str) -> float:
    if per_job(value):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise DgmError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def probability(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise DgmError(f"{name} must be a probability strictly between 0 and 1, got {value!r}")
    return float(value)


def choice(value, options, name: str):
    """`options[value]`, or an error that lists the valid names."""
    if value not in options:
        raise DgmError(f"unknown {name} {value!r}; choose from: {', '.join(sorted(options))}")
    return options[value]


def install_command(extra: str) -> str:
    """`pip install -e ".[optuna]" (or pip install hydra-optuna-sweeper)`: the extra of dgm that
    brings a plugin or client, with the packages that dgm's own metadata lists for it."""
    try:
        from packaging.requirements import Requirement

        wanted = [Requirement(line) for line in requires("dgm") or ()]
        names = [r.name for r in wanted if r.marker is not None and r.marker.evaluate({"extra": extra})]
    except (PackageNotFoundError, ImportError):  # run from a source tree that pip never installed
        names = []
    return f'pip install -e ".[{extra}]"' + (f" (or pip install {' '.join(names)})" if names else "")

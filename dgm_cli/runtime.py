"""Process-wide JAX setup for a run, and where its arrays live.

`configure` must come before JAX touches a device: it joins a multi-host job when the config
names a coordinator, and turns on JAX's persistent compilation cache, so that a run whose
programs were compiled before (the same shapes, the same versions) skips most of its start-up.
"""

import logging
from pathlib import Path

import jax
from jax.sharding import NamedSharding, PartitionSpec

from dgm_cli.errors import DgmError, positive_int

log = logging.getLogger(__name__)


def configure(cfg) -> Path | None:
    """Set up JAX for this process. -> the cache directory, if caching is on."""
    distributed = cfg.distributed
    if distributed.coordinator_address:
        jax.distributed.initialize(
            coordinator_address=distributed.coordinator_address,
            num_processes=positive_int(distributed.num_processes, "distributed.num_processes"),
            process_id=distributed.process_id,
        )
    # JAX's default, sharding-friendly threefry takes twice as long per random word on a CPU
    # (measured); wake-sleep draws a word for every binary unit it samples.
    jax.config.update("jax_threefry_partitionable", jax.default_backend() != "cpu")
    if not cfg.cache_dir:
        return None
    cache_dir = Path(cfg.cache_dir).expanduser()
    jax.config.update("jax_compilation_cache_dir", str(cache_dir / "jax"))
    # An epoch compiles in about a second, under the default threshold for caching.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return cache_dir


class Devices:
    """One device, or with `data_parallel` a mesh over all of them (every host's) along which
    each batch is split, while the parameters and the data sets are replicated."""

    def __init__(self, data_parallel: bool, batch_sizes: dict[str, int] | None = None):
        """`batch_sizes`: {setting: size} of the batches that will be split."""
        self.parallel = bool(data_parallel)
        if not self.parallel:
            return
        count = jax.device_count()
        for name, size in (batch_sizes or {}).items():
            if size % count:
                raise DgmError(f"trainer.data_parallel splits each batch over {count} devices: "
                               f"{name} {size} must be a multiple of {count}")
        # Auto axes: XLA propagates the batch split through each step from one constraint.
        mesh = jax.make_mesh((count,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._split = NamedSharding(mesh, PartitionSpec("data"))
        log.info("data parallel over %d devices: %s", count, ", ".join(str(d) for d in jax.devices()))

    def put(self, tree):
        """Arrays onto the device, or replicated onto every device of the mesh."""
        return jax.device_put(tree, self._replicated if self.parallel else None)

    def round_up(self, batch_size: int) -> int:
        """The least multiple of the device count from `batch_size` up: a batch they can split."""
        count = jax.device_count() if self.parallel else 1
        return -(-batch_size // count) * count

    def gather(self, array):
        """Inside a jitted step: the whole array on every device (and so on every host)."""
        return jax.lax.with_sharding_constraint(array, self._replicated) if self.parallel else array

    def spread(self, batch):
        """Inside a jitted step: split the batch's leading axis over the mesh."""
        return jax.lax.with_sharding_constraint(batch, self._split) if self.parallel else batch

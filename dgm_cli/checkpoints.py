"""Checkpoints of a run through an Orbax CheckpointManager, one step per epoch; the latest and
the best on validation are kept. Each step holds the training state and a JSON record of the
run's progress, which is everything a killed run needs to go on: the random keys and the data
order of every epoch follow from the config's seed and the epoch number. Orbax writes a step
under a temporary name and renames it once complete, so a step cut short by a kill is never
taken for a finished one."""

import math
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from dgm_cli.errors import DgmError
from dgm_cli.interrupts import uninterruptible

policies = ocp.checkpoint_managers


def _flat(tree) -> dict:
    # Orbax restores plain nested dicts more reliably than arbitrary pytree nodes (NNX modules
    # among them), so a state is stored as {key path: array} and rebuilt from a template.
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


class Checkpoints:
    def __init__(self, directory: Path):
        keep = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=1),
                # BestN keeps the tail of the sorted order: reversed, that is the lowest validation
                # value and, among equal ones, the earliest epoch, as the training loop chooses.
                policies.BestN(get_metric_fn=lambda m: (m["validation"], m["epoch"]), reverse=True, n=1),
            ]
        )
        options = ocp.CheckpointManagerOptions(preservation_policy=keep, cleanup_tmp_directories=True)
        self.directory = directory
        with uninterruptible():
            self._manager = ocp.CheckpointManager(directory.absolute(), options=options)
        # On an accelerator the background write overlaps the device's next epoch for free; on a
        # CPU it takes cores from that epoch's matmuls (7% of the VAE's throughput, measured), so
        # there a save finishes before training goes on.
        self._overlap_training = jax.default_backend() != "cpu"

    def save(self, epoch: int, state, validation_metric: float, record: dict) -> None:
        value = validation_metric if math.isfinite(validation_metric) else math.inf  # NaN never best
        args = ocp.args.Composite(state=ocp.args.StandardSave(_flat(state)), record=ocp.args.JsonSave(record))
        with uninterruptible():  # a save cut short leaves Orbax's helper threads waiting (interrupts.py)
            self._manager.save(epoch, args=args, metrics={"validation": value, "epoch": epoch})
            if not self._overlap_training:
                self._manager.wait_until_finished()

    def latest_epoch(self) -> int | None:
        return self._manager.latest_step()

    def record(self, epoch: int) -> dict:
        """The progress record saved with `epoch`."""
        return self._restore(epoch, record=ocp.args.JsonRestore())["record"]

    def restore(self, epoch: int, like):
        """The state saved at `epoch`, in the structure of `like` (a state or its eval_shape),
        placed as `like`'s arrays are, or on this process's first device: never where the saving
        processes had it, so that one process can read what several hosts wrote."""
        default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        template = {key: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None) or default)
                    for key, leaf in _flat(like).items()}
        flat = self._restore(epoch, state=ocp.args.StandardRestore(template))["state"]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), [flat[key] for key in template])

    def _restore(self, epoch: int, **items):
        with uninterruptible():
            self._manager.wait_until_finished()
        try:
            return self._manager.restore(epoch, args=ocp.args.Composite(**items))
        except Exception as error:  # Orbax and TensorStore raise many types for a damaged step
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise DgmError(
                f"checkpoint {epoch} in {self.directory} cannot be read ({reason[:200]}); "
                f"delete {self.directory / str(epoch)} to fall back to an earlier one"
            ) from None

    def close(self) -> None:
        with uninterruptible():
            self._manager.wait_until_finished()
            self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

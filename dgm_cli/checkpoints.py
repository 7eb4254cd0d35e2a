"""Checkpoints of the training state through an Orbax CheckpointManager, one step per epoch:
the latest and the best on validation are kept. Orbax writes each one atomically: a step
directory appears under its final name only once complete."""

import math
from pathlib import Path

import jax
import orbax.checkpoint as ocp

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
        options = ocp.CheckpointManagerOptions(preservation_policy=keep)
        self.directory = directory
        self._manager = ocp.CheckpointManager(directory.absolute(), options=options)
        # On an accelerator the background write overlaps the device's next epoch for free; on a
        # CPU it takes cores from that epoch's matmuls (7% of the VAE's throughput, measured), so
        # there a save finishes before training goes on.
        self._overlap_training = jax.default_backend() != "cpu"

    def save(self, epoch: int, state, validation_metric: float) -> None:
        value = validation_metric if math.isfinite(validation_metric) else math.inf  # NaN never best
        self._manager.save(
            epoch, args=ocp.args.StandardSave(_flat(state)), metrics={"validation": value, "epoch": epoch}
        )
        if not self._overlap_training:
            self._manager.wait_until_finished()

    def restore(self, epoch: int, like):
        """The state saved at `epoch`, in the structure of `like` (a state or its eval_shape)."""
        self._manager.wait_until_finished()
        template = _flat(like)
        restored = self._manager.restore(epoch, args=ocp.args.StandardRestore(template))
        return jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(like), [restored[key] for key in template]
        )

    def latest_epoch(self) -> int | None:
        return self._manager.latest_step()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

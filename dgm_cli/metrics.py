"""Where a run's numbers go: `metrics.jsonl` (one JSON object a line), TensorBoard event files,
and `summary.json`, which is written last and atomically, so its presence marks a finished run."""

import json
import os
from pathlib import Path

from tensorboardX import SummaryWriter


class MetricsLog:
    def __init__(self, run_dir: Path):
        self._lines = open(run_dir / "metrics.jsonl", "a")
        self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, split: str, epoch: int, step: int, values: dict[str, float]) -> None:
        record = {"epoch": epoch, "step": step, "split": split, **values}
        self._lines.write(json.dumps(record) + "\n")
        self._lines.flush()
        for name, value in values.items():
            self._tensorboard.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        self._lines.close()
        self._tensorboard.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def write_json_atomically(path: Path, value: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temporary, path)

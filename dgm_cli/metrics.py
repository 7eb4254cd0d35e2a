"""Where a run's numbers go: `metrics.jsonl` (one JSON object a line), the run's tracker
(TensorBoard by default: `dgm_cli.trackers`), and `summary.json`, which is written last and
atomically, so its presence marks a finished run."""

import json
import math
import os
from pathlib import Path


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, less a last line that a killed run left unfinished."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else ():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


class MetricsLog:
    """Appends to a run's metrics. A resumed run first drops what came after its checkpoint, so
    that every epoch appears once, as it would had the run never stopped."""

    def __init__(self, run_dir: Path, resumed_epoch: int = 0, enabled: bool = True, tracker=None):
        self.enabled = enabled  # False: the process of a multi-host run that does not write
        self._tracker = tracker  # every record goes to it too: `dgm_cli.trackers`
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        if path.exists():
            kept = [r for r in read_records(path) if r["split"] != "test" and r["epoch"] <= resumed_epoch]
            write_atomically(path, "".join(json.dumps(record) + "\n" for record in kept))
        self._lines = open(path, "a")

    def write(self, split: str, epoch: int, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"epoch": epoch, "step": step, "split": split, **values}
        self._lines.write(json.dumps(record) + "\n")
        self._lines.flush()
        if self._tracker is not None:
            self._tracker.log(split, epoch, step, values)

    def close(self) -> None:
        if self.enabled:
            self._lines.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


EVALUATIONS = "evaluations.jsonl"


def append_evaluation(run_dir: Path, evaluation: dict) -> None:
    """Keep a test evaluation of the run (every one is kept: a figure is never lost)."""
    with open(run_dir / EVALUATIONS, "a") as file:
        file.write(json.dumps(evaluation) + "\n")


def read_evaluations(run_dir: Path) -> list[dict]:
    return read_records(run_dir / EVALUATIONS)


def best_measured(evaluations: list[dict], epoch: int) -> dict:
    """Of the evaluations of `epoch`, the best measured: exact, else the most importance
    samples; the latest among equals."""
    of_epoch = [evaluation for evaluation in evaluations if evaluation["epoch"] == epoch]
    return max(reversed(of_epoch), key=lambda evaluation: evaluation["num_samples"] or math.inf)


def headline_figures(evaluation: dict) -> dict:
    """The keys of summary.json that an evaluation sets."""
    return {"test_nll": evaluation["nll"], "test_nll_samples": evaluation["num_samples"],
            "test_nll_seed": evaluation["seed"], "test_neg_elbo": evaluation["neg_elbo"]}


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_json_atomically(path: Path, value: dict) -> None:
    write_atomically(path, json.dumps(value, indent=2) + "\n")

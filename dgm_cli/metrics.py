"""Where a run's numbers go: `metrics.jsonl` (one JSON object a line), the run's tracker
(TensorBoard by default: `dgm_cli.trackers`), and `summary.json`, which is written last and
atomically, so its presence marks a finished run."""

import json
import math
import os
from pathlib import Path

import numpy as np


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
PER_IMAGE = Path("evaluations")  # beside evaluations.jsonl: the per-image log p(x) of each record


def append_evaluation(run_dir: Path, evaluation: dict, per_image: np.ndarray | None = None) -> dict:
    """Keep a test evaluation of the run (every one is kept: a figure is never lost), with the
    per-image log p(x) [N] behind it in a float32 .npy file that its record names
    ("per_image", relative to the run). -> the record as kept."""
    if per_image is not None:
        relative = PER_IMAGE / f"{len(read_evaluations(run_dir)):04d}.npy"
        (run_dir / PER_IMAGE).mkdir(exist_ok=True)
        temporary = run_dir / relative.with_suffix(".tmp.npy")
        np.save(temporary, np.asarray(per_image, np.float32))
        os.replace(temporary, run_dir / relative)
        evaluation = {**evaluation, "per_image": str(relative)}
    with open(run_dir / EVALUATIONS, "a") as file:
        file.write(json.dumps(evaluation) + "\n")
    return evaluation


def read_per_image(run_dir: Path, record: dict) -> np.ndarray | None:
    """The per-image log p(x) [N] of an evaluation record (or of summary.json's headline), if kept."""
    name = record.get("per_image") or record.get("test_per_image")
    path = run_dir / name if name else None
    return np.load(path) if path and path.is_file() else None


def read_evaluations(run_dir: Path) -> list[dict]:
    return read_records(run_dir / EVALUATIONS)


def best_measured(evaluations: list[dict], epoch: int) -> dict:
    """Of the importance-sampled (or exact) evaluations of `epoch` on the most test images (a
    record from before dgm counted them was on all), the best measured: exact, else the most
    importance samples; the latest among equals. AIS's figures are never chosen here."""
    of_epoch = [evaluation for evaluation in evaluations
                if evaluation["epoch"] == epoch and evaluation.get("method") != "ais"]
    most = max((evaluation["images"] for evaluation in of_epoch if "images" in evaluation), default=None)
    of_epoch = [evaluation for evaluation in of_epoch if evaluation.get("images", most) == most]
    return max(reversed(of_epoch), key=lambda evaluation: evaluation["num_samples"] or math.inf)


def best_annealed(evaluations: list[dict], epoch: int) -> dict:
    """Of the AIS evaluations of `epoch`, the one on the most test images, then of the most steps ×
    chains: the latest among equals (a quick AIS check never displaces a thorough one)."""
    of_epoch = [evaluation for evaluation in evaluations if evaluation["epoch"] == epoch and evaluation.get("method") == "ais"]
    return max(reversed(of_epoch), key=lambda e: (e["images"], e["ais_steps"] * e["ais_chains"]))


def headline_figures(evaluation: dict) -> dict:
    """The keys of summary.json that an evaluation sets (a record from before dgm kept the
    evidence lacks some: they are None then)."""
    figures = {"test_nll": evaluation["nll"], "test_nll_stderr": evaluation.get("nll_stderr"),
               "test_nll_method": evaluation.get("method", "exact" if evaluation["num_samples"] == 0 else "is"),
               "test_nll_converged": evaluation.get("converged"), "test_nll_samples": evaluation["num_samples"],
               "test_nll_seed": evaluation["seed"], "test_images": evaluation.get("test_images"),
               "test_per_image": evaluation.get("per_image")}
    if "neg_elbo" in evaluation:  # AIS measures log p(x) alone: the summary keeps the ELBO it had
        figures["test_neg_elbo"] = evaluation["neg_elbo"]
    return figures


def annealed_figures(evaluation: dict) -> dict:
    """The keys of summary.json that an AIS evaluation sets beside the headline."""
    return {"test_nll_ais": evaluation["nll"], "test_nll_ais_stderr": evaluation["nll_stderr"],
            "test_nll_ais_steps": evaluation["ais_steps"], "test_nll_ais_chains": evaluation["ais_chains"],
            "test_nll_ais_images": evaluation.get("test_images"), "test_nll_ais_per_image": evaluation.get("per_image")}


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_json_atomically(path: Path, value: dict) -> None:
    write_atomically(path, json.dumps(value, indent=2) + "\n")

"""Kill a VAE run on binarized_mnist with SIGKILL at random moments, resume it each time with
`dgm train resume=RUN`, and compare its end with a run that was never interrupted: every
metric of `summary.json` and every line of `metrics.jsonl`, timings aside, must be equal.

    TFDS_DATA_DIR=../shared/tensorflow_datasets python benchmarks/kill_resume.py --kills 10
"""

import argparse
import json
import random
import signal
import subprocess
import tempfile
import time
from pathlib import Path

RUN = ["model=vae", "dataset=binarized_mnist", "trainer.epochs=20", "eval.num_samples=100", "trainer.progress=false"]
TIMING = {"examples_per_sec", "seconds", "wall_seconds", "startup_seconds", "train_examples_per_sec"}


def without_timing(record: dict) -> dict:
    return {name: value for name, value in record.items() if name not in TIMING}


def metrics(run: Path) -> list[dict]:
    return [without_timing(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]


def summary(run: Path) -> dict:
    return without_timing(json.loads((run / "summary.json").read_text()))


def latest_checkpoint(run: Path) -> str:
    steps = [int(p.name) for p in (run / "checkpoints").glob("*") if p.name.isdigit()]
    return f"epoch {max(steps)}" if steps else "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="of the kill moments")
    parser.add_argument("--dir", type=Path, help="where the two runs go (default: a temporary folder)")
    args = parser.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="dgm-kill-"))

    started = time.perf_counter()
    subprocess.run(["dgm", "train", *RUN, f"hydra.run.dir={base / 'whole'}"], check=True, capture_output=True)
    whole_seconds = time.perf_counter() - started
    print(f"uninterrupted run: {whole_seconds:.0f} s")

    # Each kill comes at a random moment of the first 30% of an uninterrupted run's time after
    # its (re)start: in its start-up, an epoch, a checkpoint write or the test evaluation, and
    # seldom late enough that the run would finish before the last kill.
    moments = random.Random(args.seed)
    run = base / "killed"
    command = ["dgm", "train", *RUN, f"hydra.run.dir={run}"]
    kills = 0
    while kills < args.kills:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = moments.uniform(0.0, 0.3 * whole_seconds)
        try:
            process.wait(timeout=delay)
            break  # it finished first
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
        kills += 1
        print(f"kill {kills} after {delay:4.1f} s; latest complete checkpoint: {latest_checkpoint(run)}")
        command = ["dgm", "train", f"resume={run}"]
    if kills == args.kills:
        subprocess.run(command, check=True, capture_output=True)

    same_summary = summary(run) == summary(base / "whole")
    same_metrics = metrics(run) == metrics(base / "whole")
    print(f"{kills} kills; summary.json metrics equal: {same_summary}; metrics.jsonl equal: {same_metrics}")
    print(f"test_nll: uninterrupted {summary(base / 'whole')['test_nll']!r}, killed and resumed {summary(run)['test_nll']!r}")
    raise SystemExit(0 if same_summary and same_metrics and kills == args.kills else 1)


if __name__ == "__main__":
    main()

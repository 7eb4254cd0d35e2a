"""Wall time of whole sweeps of N seeds, packed into one vmapped program (`hydra/launcher=packed`)
against Hydra's basic launcher, which trains the same jobs one after another in one process.
Each sweep is one `dgm train -m` command, timed from its start to its end (start-up, compiling,
training, every job's test pass and files); beside it the seconds its epochs took, and for the
packed sweep its start-up (to the first epoch, compiling included). A one-job sweep of each model runs first, untimed, so
that JAX's persistent cache holds the programs of a job alone; the packed program of N jobs has
shapes of its own, and the timed packed sweep compiles it, as a user's first such sweep would.

    TFDS_DATA_DIR=../shared/tensorflow_datasets python benchmarks/packed_sweep.py
    python benchmarks/packed_sweep.py --models vae --jobs 16 -- experiment=vae_mnist   # on a GPU
"""

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

MODELS = {"vae": ["model=vae"], "sbn": ["model=sbn"]}  # the VAE 784-400-20 and the linear SBN 200 (NVIL)


def sweep(folder: Path, overrides: list[str], jobs: int, packed: bool, cache: Path) -> tuple[float, float, float]:
    """-> (wall seconds of the whole sweep, seconds its training epochs took, seconds from its
    start to its first epoch: start-up and compiling)."""
    seeds = ",".join(str(seed) for seed in range(jobs))
    launcher = ["hydra/launcher=packed"] if packed else []
    command = ["dgm", "train", "-m", *launcher, f"seed={seeds}", *overrides, "trainer.progress=false",
               f"hydra.sweep.dir={folder}"]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "DGM_CACHE_DIR": str(cache)})
    seconds = time.perf_counter() - started
    runs = sorted(path.parent for path in folder.glob("*/summary.json"))
    assert len(runs) == jobs, f"{len(runs)} of {jobs} jobs finished in {folder}"
    epochs = [{r["epoch"]: r["seconds"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if r["split"] == "train"} for run in runs]
    # A packed job's epoch time is its group's: the group trained each epoch once for all.
    training = (sum(max(times[epoch] for times in epochs) for epoch in epochs[0]) if packed
                else sum(sum(times.values()) for times in epochs))
    startup = json.loads((runs[0] / "summary.json").read_text())["startup_seconds"]
    return seconds, training, startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vae,sbn", help="of: " + ", ".join(MODELS))
    parser.add_argument("--jobs", default="1,4,16", help="sweep sizes")
    parser.add_argument("overrides", nargs="*", default=["trainer.epochs=5", "eval.num_samples=100"],
                        help="of every job (default: trainer.epochs=5 eval.num_samples=100)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="dgm-packed-"))
    print(f"every job: {' '.join(args.overrides)}")
    print("| model | jobs | one after another: wall s (training s) | packed: wall s (training s; start-up s) "
          "| packed is faster by: wall (training) |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        cache = base / f"cache-{name}"
        overrides = [*MODELS[name], *args.overrides]
        sweep(base / f"{name}-warm-up", overrides, 1, False, cache)
        for jobs in map(int, args.jobs.split(",")):
            alone, alone_training, _ = sweep(base / f"{name}-{jobs}-sequential", overrides, jobs, False, cache)
            packed, packed_training, startup = sweep(base / f"{name}-{jobs}-packed", overrides, jobs, True, cache)
            print(f"| {' '.join(MODELS[name])} | {jobs} | {alone:.1f} ({alone_training:.1f}) | {packed:.1f} "
                  f"({packed_training:.1f}; {startup:.1f}) | {alone / packed:.2f}× ({alone_training / packed_training:.2f}×) |",
                  flush=True)
    shutil.rmtree(base)


if __name__ == "__main__":
    main()

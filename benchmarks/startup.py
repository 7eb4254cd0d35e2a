"""Start-up time of two identical `dgm train` runs, the first with an empty cache directory:
how much of the time before the first epoch JAX's persistent compilation cache and the decoded
copy of the data set save. A third run, with the compiled programs taken out of the cache,
tells the two savings apart. `startup_seconds` in summary.json runs from the process start
until the epoch is compiled, just before the first epoch.

    TFDS_DATA_DIR=../shared/tensorflow_datasets python benchmarks/startup.py
"""

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

RUN = ["trainer.epochs=1", "eval.num_samples=10", "trainer.progress=false"]


def startup_seconds(run: Path, overrides: list[str], cache: Path) -> float:
    environment = {**os.environ, "DGM_CACHE_DIR": str(cache)}
    subprocess.run(["dgm", "train", *RUN, *overrides, f"hydra.run.dir={run}"], check=True, capture_output=True,
                   env=environment)
    return json.loads((run / "summary.json").read_text())["startup_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", default=["model=vae"], help="of both runs (default: model=vae)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="dgm-startup-"))
    cache = base / "cache"  # empty: the first run compiles and decodes everything
    first = startup_seconds(base / "first", args.overrides, cache)
    second = startup_seconds(base / "second", args.overrides, cache)
    shutil.rmtree(cache / "jax")
    data_only = startup_seconds(base / "third", args.overrides, cache)
    print(f"{' '.join(args.overrides)}: start-up {first:.1f} s with an empty cache, {second:.1f} s with the "
          f"first run's cache: {100 * (1 - second / first):.0f}% less; {data_only:.1f} s with its decoded data "
          f"but no compiled programs")


if __name__ == "__main__":
    main()

"""A run's AIS and refined-IS evaluations against its own importance-sampled ones, on the same
test images, paired image by image: the README's tables of the second yardstick. Reads only what
`dgm eval` kept (each record of RUN/evaluations.jsonl and its per-image log p(x)); measures nothing.

    dgm eval RUN eval.method=ais eval.num_images=200
    dgm eval RUN eval.num_images=1000 && dgm eval RUN eval.num_images=1000 eval.num_samples=2000 eval.refine_steps=100
    python benchmarks/second_yardstick.py RUN [RUN ...]
"""

import json
import sys
from pathlib import Path

import numpy as np


def standard_error(values):
    return values.std(ddof=1) / np.sqrt(len(values))


def log_p(run: Path, record: dict) -> np.ndarray:
    return np.load(run / record["per_image"]).astype(np.float64)


def main(runs: list[Path]) -> None:
    for run in runs:
        records = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]
        plain = [r for r in records if r.get("method", "is") == "is" and not r.get("refine_steps")]
        reference = max(plain, key=lambda r: (r.get("images", 0), r["num_samples"]))  # the whole test set's
        for ais in (r for r in records if r.get("method") == "ais"):
            annealed = log_p(run, ais)
            sampled = log_p(run, reference)[: len(annealed)]
            print(f"{run.name}, first {len(annealed)} images: IS {reference['num_samples']} {-sampled.mean():.2f} ± "
                  f"{standard_error(sampled):.2f}; AIS {ais['ais_steps']} steps × {ais['ais_chains']} chains "
                  f"{-annealed.mean():.2f} ± {standard_error(annealed):.2f} in {ais['seconds']:.0f} s; IS looser by "
                  f"{(annealed - sampled).mean():.2f} ± {standard_error(annealed - sampled):.2f} (paired)")
        for refined in (r for r in records if r.get("refine_steps")):
            same = [r for r in plain if r.get("images") == refined["images"] and r is not reference] or [reference]
            base = max(same, key=lambda r: r["num_samples"])
            gain = log_p(run, refined) - log_p(run, base)[: refined["images"]]
            print(f"{run.name}, first {refined['images']} images: IS {base['num_samples']} {base['nll']:.2f} in "
                  f"{base['seconds']:.1f} s; refined {refined['refine_steps']} steps + IS {refined['num_samples']} "
                  f"{refined['nll']:.2f} in {refined['seconds']:.1f} s; lower by {gain.mean():.2f} ± "
                  f"{standard_error(gain):.2f} (paired)")


if __name__ == "__main__":
    main([Path(arg) for arg in sys.argv[1:]])

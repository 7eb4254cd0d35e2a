"""`dgm report DIR`: the runs under DIR (one run, a sweep, or any folder of them) in one table.

Each row is a data set and a configuration: the overrides that set its runs apart from the
others (those that every run shares are listed once, above the table), less the seed; finished
runs that differ only in their seed are aggregated as their mean, std, count and the Student t
interval of the mean, one figure per seed (failed and unfinished ones are counted, never
averaged; a rerun of a seed is no new draw). Each figure
carries its standard error over the test images, and says where its importance sampler has not
converged. Rows tested on the same images with the same yardstick (the same sample count, or
exact) are compared with the best of them: the paired per-image difference with its standard
error, and over seeds the difference of the means with its interval. Rows are sorted by data
set, then test NLL. The table is printed
(markdown, or with --format latex a booktabs table) and written to DIR/report.md (or .tex) and
DIR/report.csv, with the validation curve of every run in DIR/curves.png: one panel per data set
and validation metric, each named for what it is. Runs trained with `trainer.diagnostics_every` add the mean variance and
signal-to-noise ratio of q's gradient estimates (averaged over the run's diagnosed epochs) to
the table, and their course over training to DIR/gradients.png; runs with a k-curve (the test
estimate from the first k samples) put it in DIR/convergence.png. Runs measured by AIS as well
(`eval.method=ais`) add that figure, and runs that `dgm gaps` measured their approximation and
amortisation gaps.
"""

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from dgm_cli import uncertainty
from dgm_cli.errors import DgmError
from dgm_cli.metrics import read_evaluations, read_per_image, read_records

COLUMNS = ["dataset", "config", "runs", "n", "test_nll", "test_nll_stderr", "test_nll_std", "test_nll_ci_low",
           "test_nll_ci_high", "test_nll_samples", "converged", "compared_with", "paired_difference",
           "paired_difference_stderr", "seed_difference", "seed_difference_ci_low", "seed_difference_ci_high",
           "best_epoch", "wall_seconds", "train_examples_per_sec", "grad_variance", "grad_snr", "test_nll_ais",
           "test_nll_ais_stderr", "approximation_gap", "approximation_gap_stderr", "amortisation_gap",
           "amortisation_gap_stderr", "status"]


@dataclass
class Run:
    path: Path
    overrides: list[str]
    summary: dict | None
    failure: str | None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, validation loss)
    gradients: list[dict] = field(default_factory=list)  # the "diagnostics" records of metrics.jsonl
    dataset: str = "?"
    metric: str = "validation loss"  # what the curve's values are, in words
    k_curve: dict[int, float] = field(default_factory=dict)  # k -> test NLL from the first k samples
    seed: object = None  # the run's seed: runs of one seed are one draw, however often rerun
    gaps: dict | None = None  # `dgm gaps`'s gaps.json, if it measured the run

    @property
    def per_image_nll(self) -> np.ndarray | None:
        """[N] −log p(x) of each test image behind the summary's figure, if kept."""
        log_p = read_per_image(self.path, self.summary) if self.summary else None
        return None if log_p is None else -log_p.astype(np.float64)

    @property
    def status(self) -> str:
        return "finished" if self.summary else "failed" if self.failure else "unfinished"

    def config(self, shared: set[str]) -> str:
        """The overrides that tell this run's configuration apart, the seed left out: "(defaults)"
        if it has none, "(the shared overrides)" if it has none but those every run shares."""
        own = sorted(o for o in self.overrides if not o.startswith(("seed=", "hydra.")))
        return " ".join(o for o in own if o not in shared) or ("(the shared overrides)" if own else "(defaults)")


def load_run(path: Path) -> Run:
    overrides = yaml.safe_load((path / ".hydra" / "overrides.yaml").read_text()) or []
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else None
    failure = (path / "FAILED").read_text().splitlines()[0] if (path / "FAILED").is_file() else None
    records = read_records(path / "metrics.jsonl")
    curve = [(record["epoch"], record["loss"]) for record in records
             if record["split"] == "validation" and "loss" in record]
    gradients = [record for record in records if record["split"] == "diagnostics"]
    config = yaml.safe_load((path / ".hydra" / "config.yaml").read_text()) if (path / ".hydra" / "config.yaml").is_file() else {}
    headline = next((e for e in read_evaluations(path) if summary and e.get("per_image") == summary.get("test_per_image")
                     and e.get("per_image")), {})
    return Run(path, overrides, summary, failure, curve, gradients, dataset=(config.get("dataset") or {}).get("name", "?"),
               metric=validation_metric(config.get("model") or {}),
               k_curve={int(k): value for k, value in headline.get("nll_by_samples", {}).items()},
               seed=config.get("seed"),
               gaps=json.loads((path / "gaps.json").read_text()) if (path / "gaps.json").is_file() else None)


def validation_metric(model: dict) -> str:
    """What a model's validation loss is, in words: it differs between the families."""
    if model.get("name") == "loglinear":
        return "validation −log p(x), exact (nats)"
    k = model.get("num_samples", 1)
    return "validation −ELBO (nats)" if k == 1 else f"validation −IWAE bound, k = {k} (nats)"


def find_runs(directory: Path) -> list[Run]:
    if not directory.is_dir():
        raise DgmError(f"{directory} is not a directory")
    paths = sorted({p.parent.parent for p in directory.rglob(".hydra/overrides.yaml")})
    if not paths:
        raise DgmError(f"no runs under {directory}: a run directory holds .hydra/overrides.yaml")
    return [load_run(path) for path in paths]


def _sample_counts(counts: list[int]) -> str | None:
    """How the NLL was measured: "exact", "5000 samples", or every count where runs differ."""
    if not counts:
        return None
    return ", ".join("exact" if count == 0 else str(count) for count in sorted(set(counts))) + (
        "" if set(counts) == {0} else " samples")


def shared_overrides(runs: list[Run]) -> set[str]:
    """The overrides every run was started with (none when there is one run: it shows them all)."""
    return set.intersection(*(set(run.overrides) for run in runs)) if len(runs) > 1 else set()


def _mean(values):
    return statistics.fmean(values) if values else None


def _converged(summaries: list[dict]) -> bool | None:
    """False if any figure's sampler has not converged, True if all have, None if unknown."""
    verdicts = [summary.get("test_nll_converged") for summary in summaries]
    return False if False in verdicts else None if None in verdicts or not verdicts else True


def _aggregate(dataset: str, config: str, members: list[Run]) -> tuple[dict, np.ndarray | None]:
    """A row of the table, and the per-image NLL [N] of its runs averaged over their seeds
    (None unless every finished run kept it, on the same test images)."""
    finished = [run for run in members if run.summary]
    summaries = [run.summary for run in finished]
    by_seed: dict = {}
    for run in finished:  # a rerun of a seed repeats its draw: one figure per seed, not per run
        by_seed.setdefault(run.seed, []).append(run.summary["test_nll"])
    nlls = [statistics.fmean(values) for values in by_seed.values()]
    interval = uncertainty.mean_interval(nlls)
    per_image = [run.per_image_nll for run in finished]
    same_images = len({s.get("test_images") for s in summaries}) == 1 and None not in {s.get("test_images") for s in summaries}
    per_image = np.mean(per_image, axis=0) if per_image and same_images and all(p is not None for p in per_image) else None
    stderr = (uncertainty.standard_error(per_image) if per_image is not None
              else summaries[0].get("test_nll_stderr") if len(summaries) == 1 else None)
    statuses = [run.status for run in members]
    row = {
        "dataset": dataset,
        "config": config,
        "runs": len(members),
        "n": len(nlls),  # of seeds
        "test_nll": _mean(nlls),
        "test_nll_stderr": stderr,
        "test_nll_std": statistics.stdev(nlls) if len(nlls) > 1 else None,
        "test_nll_ci_low": interval and interval[0],
        "test_nll_ci_high": interval and interval[1],
        "test_nll_samples": _sample_counts([s["test_nll_samples"] for s in summaries]),
        "converged": _converged(summaries),
        "best_epoch": _mean([s["best_epoch"] for s in summaries]),
        "wall_seconds": _mean([s["wall_seconds"] for s in summaries]),
        "train_examples_per_sec": _mean([s["train_examples_per_sec"] for s in summaries]),
        **{name: _mean([r[name] for run in members for r in run.gradients]) for name in ("grad_variance", "grad_snr")},
        **_measured_once_or_averaged([s.get("test_nll_ais") for s in summaries],
                                     [s.get("test_nll_ais_stderr") for s in summaries], "test_nll_ais"),
        **{key: value for gap in ("approximation_gap", "amortisation_gap") for key, value in _measured_once_or_averaged(
            [run.gaps and run.gaps[gap]["mean"] for run in finished],
            [run.gaps and run.gaps[gap]["stderr"] for run in finished], gap).items()},
        "status": ", ".join(f"{statuses.count(s)} {s}" for s in ("finished", "failed", "unfinished") if s in statuses),
        "_yardstick": (dataset, summaries[0].get("test_images"), summaries[0]["test_nll_samples"])
        if summaries and same_images and len({s["test_nll_samples"] for s in summaries}) == 1 else None,
        "_nlls": nlls,
    }
    return row, per_image


def _measured_once_or_averaged(values: list, stderrs: list, name: str) -> dict:
    """{name: the mean of the runs' figures, name_stderr: the one run's standard error}, both None
    unless every run has the figure (a run's s.e. does not carry over to a mean of seeds)."""
    if not values or None in values:
        return {name: None, f"{name}_stderr": None}
    return {name: _mean(values), f"{name}_stderr": stderrs[0] if len(values) == 1 else None}


def _compare(rows: list[dict], per_image: list[np.ndarray | None]) -> None:
    """Each row against the best row measured with the same yardstick on the same images: the
    paired per-image difference and its standard error, and over seeds the difference of the
    means with its interval. Rows with nothing to compare with get none."""
    groups: dict[tuple, list[int]] = {}
    for index, row in enumerate(rows):
        if row["_yardstick"] is not None:
            groups.setdefault(row["_yardstick"], []).append(index)
    for members in groups.values():
        if len(members) < 2:
            continue
        best = min(members, key=lambda index: rows[index]["test_nll"])
        for index in members:
            row = rows[index]
            row["compared_with"] = rows[best]["config"]
            if index == best:
                continue
            if per_image[index] is not None and per_image[best] is not None:
                difference = per_image[index] - per_image[best]
                row["paired_difference"] = float(np.mean(difference))
                row["paired_difference_stderr"] = uncertainty.standard_error(difference)
            row["seed_difference"] = row["test_nll"] - rows[best]["test_nll"]
            interval = uncertainty.difference_interval(row["_nlls"], rows[best]["_nlls"])
            if interval:
                row["seed_difference_ci_low"], row["seed_difference_ci_high"] = interval


def table(runs: list[Run]) -> list[dict]:
    shared = shared_overrides(runs)
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.dataset, run.config(shared)), []).append(run)
    aggregated = [_aggregate(dataset, config, members) for (dataset, config), members in groups.items()]
    rows = [{name: None for name in COLUMNS} | row for row, _ in aggregated]
    _compare(rows, [per_image for _, per_image in aggregated])
    for row in rows:
        del row["_yardstick"], row["_nlls"]
    return sorted(rows, key=lambda row: (row["dataset"], row["test_nll"] is None, row["test_nll"] or 0.0))


def _number(value, digits: int) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def describe_comparison(row: dict) -> str:
    """"+0.79 ± 0.06 behind method=vimco; over 3 seeds +0.80 (95% CI 0.20 to 1.40)", "best", or "–"."""
    if row["compared_with"] is None:
        return "–"
    if row["compared_with"] == row["config"]:
        return "best"
    parts = []
    if row["paired_difference"] is not None:
        parts.append(f"{row['paired_difference']:+.2f} ± {row['paired_difference_stderr']:.2f} on the same images")
    if row["seed_difference_ci_low"] is not None:
        parts.append(f"over seeds {row['seed_difference']:+.2f} (95% CI {row['seed_difference_ci_low']:.2f} to "
                     f"{row['seed_difference_ci_high']:.2f})")
    elif not parts:
        parts.append(f"{row['seed_difference']:+.2f}")
    return f"behind {row['compared_with']}: " + "; ".join(parts)


def _with_stderr(row: dict, name: str) -> str:
    if row[name] is None:
        return "–"
    return f"{row[name]:.2f}" + (f" ± {row[f'{name}_stderr']:.2f}" if row[f"{name}_stderr"] is not None else "")


# Columns shown only when some row has them: (headers, the row's cells, the key that says it has them).
EXTRAS = [
    (["q-gradient variance", "q-gradient SNR"],
     lambda row: ["–" if row["grad_variance"] is None else f"{row['grad_variance']:.3g}", _number(row["grad_snr"], 3)],
     "grad_variance"),
    (["test NLL by AIS ± s.e. (nats)"], lambda row: [_with_stderr(row, "test_nll_ais")], "test_nll_ais"),
    (["approximation gap ± s.e.", "amortisation gap ± s.e."],
     lambda row: [_with_stderr(row, "approximation_gap"), _with_stderr(row, "amortisation_gap")], "approximation_gap"),
]


def _extras(rows: list[dict]) -> list:
    return [extra for extra in EXTRAS if any(row[extra[2]] is not None for row in rows)]


def _format(row: dict, extras: list) -> list[str]:
    how = (row["test_nll_samples"] or "") + (", not converged" if row["converged"] is False else "")
    nll = "–" if row["test_nll"] is None else f"{row['test_nll']:.2f}" + (
        f" ± {row['test_nll_stderr']:.2f}" if row["test_nll_stderr"] is not None else "") + f" ({how})"
    seeds = "–" if row["n"] < 2 else (f"{row['test_nll_std']:.2f}, n = {row['n']}, 95% CI "
                                      f"{row['test_nll_ci_low']:.2f} to {row['test_nll_ci_high']:.2f}")
    return [row["dataset"], row["config"], str(row["runs"]), nll, seeds, describe_comparison(row),
            _number(row["best_epoch"], 0), _number(row["wall_seconds"], 0), _number(row["train_examples_per_sec"], 0),
            *(cell for _, cells, _ in extras for cell in cells(row)), row["status"]]


def _header(rows: list[dict]) -> list[str]:
    return ["dataset", "config (overrides)", "runs", "test NLL ± s.e. over images (nats)", "std over seeds",
            "against the best", "best epoch", "wall s", "examples/s",
            *(header for headers, _, _ in _extras(rows) for header in headers), "status"]


def markdown(rows: list[dict], shared: set[str]) -> str:
    header = _header(rows)
    lines = [f"Every run: `{' '.join(sorted(shared))}`", ""] if shared else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_format(row, _extras(rows))) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def latex(rows: list[dict], shared: set[str]) -> str:
    """The table for a paper: booktabs rules, the shared overrides in a comment above it."""
    def escape(text: str) -> str:
        for plain, escaped in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                               ("$", r"\$"), ("{", r"\{"), ("}", r"\}"), ("±", r"$\pm$"), ("–", "--"), ("~", r"\~{}")):
            text = text.replace(plain, escaped)
        return text

    header = _header(rows)
    lines = [f"% every run: {' '.join(sorted(shared))}"] if shared else []
    lines += [r"\begin{tabular}{ll" + "r" * (len(header) - 3) + "l}", r"\toprule",
              " & ".join(escape(cell) for cell in header) + r" \\", r"\midrule"]
    lines += [" & ".join(escape(cell) for cell in _format(row, _extras(rows))) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[Run], rows: list[dict], path: Path) -> None:
    """Every run's validation curve, one colour per configuration (its seeds share it), the
    configurations in the order of the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shared = shared_overrides(runs)
    colours = {row["config"]: f"C{index % 10}" for index, row in enumerate(rows)}
    # One panel per data set and metric: an IWAE bound and an exact likelihood, or two data
    # sets, on one axis would invite comparisons that mean nothing.
    panels = sorted({(run.dataset, run.metric) for run in runs if run.curve}) or [("?", "validation loss (nats)")]
    figure, axes_list = plt.subplots(1, len(panels), figsize=(8 * len(panels), 5), squeeze=False)
    for axes, (dataset, metric) in zip(axes_list[0], panels):
        labelled = set()
        for run in runs:
            config = run.config(shared)
            if run.curve and (run.dataset, run.metric) == (dataset, metric):
                epochs, losses = zip(*run.curve)
                axes.plot(epochs, losses, color=colours[config], label=None if config in labelled else config)
                labelled.add(config)
        axes.set(xlabel="epoch", ylabel=metric, title=f"{dataset}: validation curves")
        if 0 < len(labelled) <= 12:
            axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_gradients(runs: list[Run], rows: list[dict], path: Path) -> None:
    """The variance and signal-to-noise ratio of q's gradient estimates over training, one
    colour per configuration as in the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shared = shared_overrides(runs)
    colours = {row["config"]: f"C{index % 10}" for index, row in enumerate(rows)}
    figure, (variance_axes, snr_axes) = plt.subplots(1, 2, figsize=(11, 4.5))
    labelled = set()
    for run in runs:
        config = run.config(shared)
        if run.gradients:
            epochs = [record["epoch"] for record in run.gradients]
            label = None if config in labelled else config
            variance_axes.plot(epochs, [r["grad_variance"] for r in run.gradients], color=colours[config], label=label)
            snr_axes.plot(epochs, [r["grad_snr"] for r in run.gradients], color=colours[config])
            labelled.add(config)
    variance_axes.set(xlabel="epoch", ylabel="mean variance per parameter", yscale="log",
                      title="variance of q's gradient estimates")
    snr_axes.set(xlabel="epoch", ylabel="‖E g‖ / √(Σ Var g)", yscale="log",
                 title="signal-to-noise ratio")
    if 0 < len(labelled) <= 12:
        variance_axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_convergence(runs: list[Run], rows: list[dict], path: Path) -> None:
    """Each run's k-curve, the test NLL from the first k importance samples of every image, one
    panel per data set: a curve still falling at its right end has not converged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shared = shared_overrides(runs)
    colours = {row["config"]: f"C{index % 10}" for index, row in enumerate(rows)}
    datasets = sorted({run.dataset for run in runs if run.k_curve})
    figure, axes_list = plt.subplots(1, len(datasets), figsize=(8 * len(datasets), 5), squeeze=False)
    for axes, dataset in zip(axes_list[0], datasets):
        labelled = set()
        for run in runs:
            config = run.config(shared)
            if run.k_curve and run.dataset == dataset:
                counts = sorted(run.k_curve)
                axes.plot(counts, [run.k_curve[k] for k in counts], "o-", color=colours[config],
                          label=None if config in labelled else config)
                labelled.add(config)
        axes.set(xscale="log", xlabel="importance samples per image, k", ylabel="test NLL from the first k (nats)",
                 title=f"{dataset}: has the test estimate converged?")
        if 0 < len(labelled) <= 12:
            axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def search_result(directory: Path, runs: list[Run]) -> str | None:
    """The line that names the best trial of an Optuna search (Hydra's sweeper leaves its
    optimization_results.yaml in the sweep directory), or None for another folder."""
    path = directory / "optimization_results.yaml"
    if not path.is_file():
        return None
    result = yaml.safe_load(path.read_text())
    chosen = [f"{name}={value}" for name, value in result["best_params"].items()]
    trial = next((run.path for run in runs if set(chosen) <= set(run.overrides)), None)
    return (f"Optuna's best trial: `{' '.join(chosen)}`, best validation value {result['best_value']:.4f}"
            + (f" ({trial})" if trial else "") + f"; {len(runs)} trials")


def report(directory: Path, format: str = "markdown") -> tuple[str, list[str], str | None]:
    """The table (markdown or latex), the names of the files written into `directory`, and why
    none could be written (a folder that is not ours to write), if so."""
    runs = find_runs(directory)
    rows = table(runs)
    shared = shared_overrides(runs)
    text = latex(rows, shared) if format == "latex" else markdown(rows, shared)
    search = search_result(directory, runs)
    if search:
        text = ("% " if format == "latex" else "") + search + "\n\n" + text
    try:
        written = _write_files(directory, runs, rows, text, "report.tex" if format == "latex" else "report.md")
    except OSError as error:
        return text, [], f"{error.strerror or error}: {error.filename or directory}"
    return text, written, None


def _write_files(directory: Path, runs: list[Run], rows: list[dict], text: str, name: str) -> list[str]:
    (directory / name).write_text(text)
    with open(directory / "report.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot_curves(runs, rows, directory / "curves.png")
    written = [name, "report.csv", "curves.png"]
    if any(row["grad_variance"] is not None for row in rows):
        plot_gradients(runs, rows, directory / "gradients.png")
        written.append("gradients.png")
    if any(run.k_curve for run in runs):
        plot_convergence(runs, rows, directory / "convergence.png")
        written.append("convergence.png")
    return written

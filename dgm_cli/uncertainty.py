"""How sure a figure is: the standard error of a test NLL over the test images, whether its
importance sampler has converged, and intervals for means and differences over seeds.

A test NLL is a mean over images of per-image estimates −log p̂(x); its standard error is that
of a mean. An importance-sampled estimate is a stochastic lower bound of log p(x) that rises
towards it as k grows, so one figure cannot show whether k sufficed: the k-curve (the estimate
from each image's first k samples, read off the same draws) and the effective sample size can.
"""

import math

import numpy as np

CONFIDENCE = 0.95  # of every interval dgm prints


def _t_quantile(probability: float, dof: float) -> float:
    # Imported here: scipy.stats takes most of a second to import, which every `dgm train`
    # would pay at start-up for figures that only reports print.
    from scipy import stats

    return float(stats.t.ppf(probability, dof))


def standard_error(values) -> float:
    """The standard error of the mean of `values` [N]: their sample std / √N (0 for one value)."""
    values = np.asarray(values, np.float64)
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def mean_interval(values) -> tuple[float, float] | None:
    """The Student t interval of the mean of `values` at `CONFIDENCE`, or None for fewer than two."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return None
    half = _t_quantile(0.5 + CONFIDENCE / 2, len(values) - 1) * standard_error(values)
    return float(np.mean(values) - half), float(np.mean(values) + half)


def difference_interval(a, b) -> tuple[float, float] | None:
    """The interval of mean(a) − mean(b) for independent samples (Welch's t, which does not
    assume equal variances), or None unless both have two values or more."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    difference = float(np.mean(a) - np.mean(b))
    if va + vb == 0:
        return difference, difference
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch–Satterthwaite
    half = _t_quantile(0.5 + CONFIDENCE / 2, dof) * math.sqrt(va + vb)
    return difference - half, difference + half


def convergence(nll_by_samples: dict[int, float], stderr: float) -> tuple[bool, str]:
    """(converged, why): converged when the last tenfold increase of k, from K/10 to K samples,
    moved the estimate by less than its standard error."""
    counts = sorted(nll_by_samples)
    last = counts[-1]
    if last < 10:
        return False, f"with {last} samples there is no tenfold increase of k to judge convergence by"
    before = last // 10
    change = nll_by_samples[last] - nll_by_samples[before]
    verdict = abs(change) < stderr
    relation = "less" if verdict else "more"
    direction = "fell" if change < 0 else "rose"
    return verdict, (f"from k = {before} to {last} samples the NLL estimate {direction} by {abs(change):.3f} nats, "
                     f"{relation} than its standard error {stderr:.3f}")


def summarise(evidence: dict, sample_counts: tuple[int, ...] | None) -> dict:
    """The figures of a test pass from its per-image evidence (`steps.log_likelihoods`): the NLL
    and its standard error; sampled (`sample_counts`, the k of the curve), also the k-curve
    "nll_by_samples", the effective sample size over K (median and 5th percentile over images),
    "converged" and "convergence" (the verdict in words)."""
    log_p = np.asarray(evidence["log_p"], np.float64)
    figures = {"nll": -float(np.mean(log_p)), "nll_stderr": standard_error(log_p)}
    if sample_counts is None:
        return {**figures, "converged": True, "convergence": "exact"}
    curve = {k: -float(np.mean(column)) for k, column in zip(sample_counts, np.asarray(evidence["log_p_by_k"]).T)}
    ess_over_k = np.exp(np.asarray(evidence["log_ess"], np.float64)) / sample_counts[-1]
    converged, why = convergence(curve, figures["nll_stderr"])
    return {**figures, "nll_by_samples": {str(k): value for k, value in curve.items()},
            "ess_over_k_median": float(np.median(ess_over_k)), "ess_over_k_p5": float(np.percentile(ess_over_k, 5)),
            "converged": converged, "convergence": why}


def summarise_annealed(evidence: dict, chains: int) -> dict:
    """The figures of an AIS pass (`steps.make_annealed_log_likelihood`): the NLL and its standard
    error over images, the chains' effective sample size over C (median and 5th percentile over
    images) and, where HMC moved the chains, its mean acceptance rate. AIS has no k-curve: its steps and chains say how it was
    measured, and a second run with more steps says whether they sufficed."""
    log_p = np.asarray(evidence["log_p"], np.float64)
    ess_over_chains = np.exp(np.asarray(evidence["log_ess"], np.float64)) / chains
    figures = {"nll": -float(np.mean(log_p)), "nll_stderr": standard_error(log_p),
               "ess_over_chains_median": float(np.median(ess_over_chains)),
               "ess_over_chains_p5": float(np.percentile(ess_over_chains, 5))}
    if "acceptance" in evidence:  # HMC's; Gibbs accepts every move
        figures["acceptance"] = float(np.mean(evidence["acceptance"]))
    return figures

"""Gradient estimators for sigmoid belief nets trained on one objective (`model=sbn`).

The objective is L̂ = log (1/K) Σ_k w_k, w_k = p(x, h_k) / q(h_k|x), h_k ~ q(h|x): the ELBO for
K = 1, the importance-weighted bound for K > 1 (but `rloo`, which trains the ELBO averaged over its
K draws); w̃_k = w_k / Σ_j w_j. Each estimator is a function

    estimate(nets, stats, x, key, settings) -> (surrogate, (stats, metrics))

whose surrogate is a scalar loss: its gradient with respect to `nets` (generative θ, recognition λ,
and the estimator's own nets ψ: baselines or control variates) IS the estimate of −∇ E[L̂] (and of ψ's own loss). θ gets
the ordinary −Σ_k w̃_k ∇_θ log p(x, h_k) from every discrete estimator; the estimators differ in λ.
`stats` are running statistics (means and variances of learning signals, one per stochastic layer,
and the step count), carried in the model state so that a resumed run goes on exactly. `metrics`
are the batch means "loss" (−L̂) and "neg_elbo" (−mean_k log w_k).

Split by family: `score_function` (baselined REINFORCE), `antithetic` (ARM's pairs), `relaxed`
(continuous units and the straight-through family), `control_variates` (REBAR and RELAX, their
control variates learned); `base` holds what they share. A new estimator is one function in its
family's module and one entry in ESTIMATORS. Unbiased: reinforce, nvil (up to its variance
normalisation), vimco, rloo, arm, disarm, rebar, relax; biased: concrete, straight_through,
gumbel_st, reinmax.
"""

from typing import NamedTuple

from dgm_cli.estimators.antithetic import arm, disarm
from dgm_cli.estimators.base import Nets, Settings, init_stats
from dgm_cli.estimators.control_variates import controlled, rebar_control, relax_control
from dgm_cli.estimators.relaxed import concrete, gumbel_st, reinmax, straight_through
from dgm_cli.estimators.score_function import baseline_nets, nvil, reinforce, rloo, vimco

__all__ = ["ESTIMATORS", "Estimator", "Nets", "Settings", "init_stats"]


class Estimator(NamedTuple):
    estimate: object  # estimate(nets, stats, x, key, settings) -> (surrogate, (stats, metrics))
    min_samples: int  # the fewest samples K it works with
    max_samples: int | None  # the most (None: any)
    # its own nets ψ, if any: controls(recognition, sizes [D, *layers], hidden, activation, settings, rngs)
    controls: object = None
    averaged_elbo: bool = False  # trains the ELBO averaged over its K draws, not the K-sample bound
    categorical: bool = True  # applies to categorical units too (`dgm_cli.units`), not to binary ones only


ESTIMATORS = {
    "reinforce": Estimator(reinforce, 1, 1),
    "nvil": Estimator(nvil, 1, 1, baseline_nets),
    "vimco": Estimator(vimco, 2, None),
    "rloo": Estimator(rloo, 2, None, averaged_elbo=True),
    "arm": Estimator(arm, 1, None, categorical=False),
    "disarm": Estimator(disarm, 1, None, categorical=False),
    "rebar": Estimator(controlled, 1, None, rebar_control),  # the two differ in their control variate only
    "relax": Estimator(controlled, 1, None, relax_control),
    "concrete": Estimator(concrete, 1, None),
    "straight_through": Estimator(straight_through, 1, None),
    "gumbel_st": Estimator(gumbel_st, 1, None),
    "reinmax": Estimator(reinmax, 1, None),
}

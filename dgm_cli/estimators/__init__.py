"""Gradient estimators for sigmoid belief nets trained on one objective (`model=sbn`).

The objective is L̂ = log (1/K) Σ_k w_k, w_k = p(x, h_k) / q(h_k|x), h_k ~ q(h|x): the ELBO for
K = 1, the importance-weighted bound for K > 1 (but `rloo`, which trains the ELBO averaged over its
K draws); w̃_k = w_k / Σ_j w_j. Each estimator is a function

    estimate(nets, stats, x, key, settings) -> (surrogate, (stats, metrics))

whose surrogate is a scalar loss: its gradient with respect to `nets` (generative θ, recognition λ,
and the estimator's own baseline nets ψ) IS the estimate of −∇ E[L̂] (and of ψ's own loss). θ gets
the ordinary −Σ_k w̃_k ∇_θ log p(x, h_k) from every discrete estimator; the estimators differ in λ.
`stats` are running statistics (means and variances of learning signals, one per stochastic layer,
and the step count), carried in the model state so that a resumed run goes on exactly. `metrics`
are the batch means "loss" (−L̂) and "neg_elbo" (−mean_k log w_k).

Split by family: `score_function` (baselined REINFORCE), `antithetic` (ARM's pairs), `relaxed`
(continuous units); `base` holds what they share. A new estimator is one function in its family's
module and one entry in ESTIMATORS.
"""

from typing import NamedTuple

from dgm_cli.estimators.antithetic import arm, disarm
from dgm_cli.estimators.base import Nets, Settings, init_stats
from dgm_cli.estimators.relaxed import concrete
from dgm_cli.estimators.score_function import nvil, reinforce, rloo, vimco

__all__ = ["ESTIMATORS", "Estimator", "Nets", "Settings", "init_stats"]


class Estimator(NamedTuple):
    estimate: object  # estimate(nets, stats, x, key, settings) -> (surrogate, (stats, metrics))
    min_samples: int  # the fewest samples K it works with
    max_samples: int | None  # the most (None: any)
    baselines: bool  # whether it trains a baseline net per layer (ψ)
    averaged_elbo: bool = False  # trains the ELBO averaged over its K draws, not the K-sample bound


ESTIMATORS = {
    "reinforce": Estimator(reinforce, 1, 1, False),
    "nvil": Estimator(nvil, 1, 1, True),
    "vimco": Estimator(vimco, 2, None, False),
    "rloo": Estimator(rloo, 2, None, False, averaged_elbo=True),
    "arm": Estimator(arm, 1, None, False),
    "disarm": Estimator(disarm, 1, None, False),
    "concrete": Estimator(concrete, 1, None, False),
}

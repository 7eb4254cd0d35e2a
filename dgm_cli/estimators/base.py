"""What every estimator shares: its settings, its networks, the running statistics of its learning
signals, one set of draws from q, and θ's gradient."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dgm_cli import objectives

sg = jax.lax.stop_gradient

def trajectory(recognition, x, key, num_samples, flipped=None, unit=None):
    """h ~ q(h|x) layer by layer from uniforms u_l (`dgm_cli.units`: 24-bit for binary units), the
    layer `flipped` drawn from 1 − u_l instead: its antithetic twin. Every layer's uniforms follow
    from `key` alone, so two trajectories differ only from the flipped layer on. `unit(b, a, u)`, if
    given, is what each layer passes on for its draw b (the straight-through estimators' b with a
    surrogate derivative in a). -> hidden [h_1, …], logits [a_1, …] and uniforms [u_1, …], each [K, B, …]."""
    h, hidden, logits, uniforms = x, [], [], []
    for index, (conditional, units) in enumerate(zip(recognition.conditionals, recognition.units)):
        a = conditional(h)
        shape = (num_samples, *a.shape) if index == 0 else a.shape
        h, u = units.draw(jax.random.fold_in(key, index), a, shape, flipped=index == flipped)
        a = jnp.broadcast_to(a, shape)
        h = h if unit is None else unit(h, a, u)
        hidden.append(h)
        logits.append(a)
        uniforms.append(u)
    return hidden, logits, uniforms


class Settings(NamedTuple):
    num_samples: int         # K
    baseline_decay: float    # α of the running means and variances: new = α old + (1 − α) batch
    temperature: float       # τ of the relaxed posterior (concrete, gumbel_st; rebar's and relax's start), ReinMax's τ
    prior_temperature: float  # τ of the relaxed prior and generative conditionals (concrete)


class Nets(NamedTuple):
    generative: object   # helmholtz.Generative
    recognition: object  # helmholtz.StochasticChain
    baselines: object    # the estimator's own nets ψ: nvil's baselines, rebar's and relax's control variates, or None


def init_stats(num_layers: int):
    zeros = jnp.zeros(num_layers)
    return {"steps": jnp.zeros((), jnp.int32), "mean": zeros, "var": zeros}


def running(stats, decay):
    """(mean, var) of the running statistics, bias-corrected as Adam's moments are: 0 before any step.
    They are those of the steps before this batch, so that a sample's baseline never depends on it."""
    steps = stats["steps"]
    correction = jnp.where(steps > 0, 1.0 - jnp.power(decay, steps), 1.0)
    return stats["mean"] / correction, stats["var"] / correction


def update(stats, decay, mean, var):
    return {"steps": stats["steps"] + 1, "mean": decay * stats["mean"] + (1 - decay) * mean,
            "var": decay * stats["var"] + (1 - decay) * var}


def bound_metrics(log_w):
    """log_w: [K, B] -> the batch means of −L̂ and −log w."""
    return {"loss": -jnp.mean(objectives.log_mean_exp(log_w)), "neg_elbo": -jnp.mean(log_w)}


def draw(nets, x, key, num_samples):
    """K draws h ~ q(h|x) with 24-bit draws. -> hidden [h_1, …] each [K, B, size], log p [K, B]
    (a function of θ), log q [K, B] (a function of λ), log w [K, B] (constant)."""
    hidden, log_q = nets.recognition.sample(x, key, num_samples)
    log_p = nets.generative.log_prob(x, hidden)
    return hidden, log_p, log_q, sg(log_p - log_q)


def generative_loss(log_p, log_w):
    """−mean_B Σ_k w̃_k log p(x, h_k), w̃ constant: its θ-gradient is the ordinary one."""
    return -jnp.mean(jnp.sum(jax.nn.softmax(log_w, axis=0) * log_p, axis=0))

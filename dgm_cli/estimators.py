"""Gradient estimators for sigmoid belief nets trained on one objective (`model=sbn`).

The objective is L̂ = log (1/K) Σ_k w_k, w_k = p(x, h_k) / q(h_k|x), h_k ~ q(h|x): the ELBO for
K = 1, the importance-weighted bound for K > 1; w̃_k = w_k / Σ_j w_j. Each estimator is a function

    estimate(nets, stats, x, key, settings) -> (surrogate, (stats, metrics))

whose surrogate is a scalar loss: its gradient with respect to `nets` (generative θ, recognition λ,
and the estimator's own baseline nets ψ) IS the estimate of −∇ E[L̂] (and of ψ's own loss). θ gets
the ordinary −Σ_k w̃_k ∇_θ log p(x, h_k) from every discrete estimator; the estimators differ in λ.
`stats` are running statistics (means and variances of learning signals, one per stochastic layer,
and the step count), carried in the model state so that a resumed run goes on exactly. `metrics`
are the batch means "loss" (−L̂) and "neg_elbo" (−mean_k log w_k).

A new estimator (REBAR, RELAX, …) is one function here and one entry in ESTIMATORS.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dgm_cli import objectives
from dgm_cli.models.helmholtz import fires

sg = jax.lax.stop_gradient


class Settings(NamedTuple):
    num_samples: int         # K
    baseline_decay: float    # α of the running means and variances: new = α old + (1 − α) batch
    temperature: float       # τ of the relaxed posterior (concrete)
    prior_temperature: float  # τ of the relaxed prior and generative conditionals (concrete)


class Nets(NamedTuple):
    generative: object   # helmholtz.Generative
    recognition: object  # helmholtz.BernoulliChain
    baselines: object    # nnx.List of one MLP per stochastic layer (nvil), else None


def init_stats(num_layers: int):
    zeros = jnp.zeros(num_layers)
    return {"steps": jnp.zeros((), jnp.int32), "mean": zeros, "var": zeros}


def _running(stats, decay):
    """(mean, var) of the running statistics, bias-corrected as Adam's moments are: 0 before any step.
    They are those of the steps before this batch, so that a sample's baseline never depends on it."""
    steps = stats["steps"]
    correction = jnp.where(steps > 0, 1.0 - jnp.power(decay, steps), 1.0)
    return stats["mean"] / correction, stats["var"] / correction


def _update(stats, decay, mean, var):
    return {"steps": stats["steps"] + 1, "mean": decay * stats["mean"] + (1 - decay) * mean,
            "var": decay * stats["var"] + (1 - decay) * var}


def _bound_metrics(log_w):
    """log_w: [K, B] -> the batch means of −L̂ and −log w."""
    return {"loss": -jnp.mean(objectives.log_mean_exp(log_w)), "neg_elbo": -jnp.mean(log_w)}


def _draw(nets, x, key, num_samples):
    """K draws h ~ q(h|x) with 24-bit draws. -> hidden [h_1, …] each [K, B, size], log p [K, B]
    (a function of θ), log q [K, B] (a function of λ), log w [K, B] (constant)."""
    hidden, log_q = nets.recognition.sample(x, key, num_samples)
    log_p = nets.generative.log_prob(x, hidden)
    return hidden, log_p, log_q, sg(log_p - log_q)


def _generative_loss(log_p, log_w):
    """−mean_B Σ_k w̃_k log p(x, h_k), w̃ constant: its θ-gradient is the ordinary one."""
    return -jnp.mean(jnp.sum(jax.nn.softmax(log_w, axis=0) * log_p, axis=0))


def reinforce(nets, stats, x, key, settings):
    """Score function with a running-mean baseline (K = 1):
    ∇_λ L ≈ (l − b) ∇_λ log q(h|x), l = log p(x,h) − log q(h|x), b the running mean of l.
    (∇_λ l = −∇_λ log q has mean zero and is left out, as is usual.)"""
    _, log_p, log_q, log_w = _draw(nets, x, key, 1)
    mean, _ = _running(stats, settings.baseline_decay)
    signal = log_w[0] - mean[0]  # [B]
    surrogate = -jnp.mean(signal * log_q[0])
    batch_mean = jnp.mean(log_w[0])
    stats = _update(stats, settings.baseline_decay, stats["mean"].at[0].set(batch_mean), stats["var"])
    return _generative_loss(log_p, log_w) + surrogate, (stats, _bound_metrics(log_w))


def nvil(nets, stats, x, key, settings):
    """NVIL (Mnih & Gregor 2014), K = 1, one learning signal per stochastic layer i:
    l_i = log p(h_{i−1}, …, h_L) − log q(h_i, …, h_L | h_{i−1}) (h_0 = x; the terms below layer i
    are independent of h_i given h_{i−1} and drop out), and
    ∇_{λ_i} L ≈ (l_i − c_i − C_ψi(h_{i−1})) / max(1, σ̂_i) ∇_{λ_i} log q(h_i | h_{i−1}),
    c_i and σ̂_i² the running mean and variance of l_i − C_ψi(h_{i−1}); ψ_i descends
    (l_i − c_i − C_ψi(h_{i−1}))². With one layer l_1 = log p(x,h) − log q(h|x)."""
    hidden, _ = nets.recognition.sample(x, key, 1)
    hidden = [h[0] for h in hidden]  # [B, size] each, constants (thresholded draws)
    below = [x, *hidden[:-1]]  # h_{i−1} for each layer i
    log_p_terms = nets.generative.layer_log_probs(x, hidden)  # [log p(x|h_1), …, log p(h_L)], [B] each
    log_q_terms = nets.recognition.layer_log_probs(x, hidden)  # [log q(h_1|x), …], [B] each
    # l_i = Σ_{j ≥ i} (log p(h_{j−1} | h_j) − log q(h_j | h_{j−1})) + log p(h_L)
    steps = sg(jnp.stack(log_p_terms[:-1]) - jnp.stack(log_q_terms))  # [L, B]
    local = jnp.flip(jnp.cumsum(jnp.flip(steps, 0), 0), 0) + sg(log_p_terms[-1])  # [L, B]
    predicted = jnp.stack([baseline(h)[..., 0] for baseline, h in zip(nets.baselines, below)])  # [L, B]
    mean, var = _running(stats, settings.baseline_decay)
    centred = local - sg(predicted)  # [L, B]
    signal = sg((centred - mean[:, None]) / jnp.maximum(1.0, jnp.sqrt(var))[:, None])
    surrogate = -jnp.mean(jnp.sum(signal * jnp.stack(log_q_terms), 0))
    baseline_loss = jnp.mean(jnp.sum(jnp.square(local - mean[:, None] - predicted), 0))
    stats = _update(stats, settings.baseline_decay, jnp.mean(centred, 1), jnp.var(centred, 1))
    log_p, log_w = sum(log_p_terms)[None], local[:1]  # l_1 = log w, [1, B]
    metrics = {**_bound_metrics(log_w), "baseline_loss": baseline_loss}
    return _generative_loss(log_p, log_w) + surrogate + baseline_loss, (stats, metrics)


def _leave_one_out_bounds(log_w):
    """L̂_{−j} = log (1/K) (Σ_{k≠j} w_k + exp(mean_{k≠j} log w_k)) for each j, in log space. [K, B]"""
    k = log_w.shape[0]
    geometric = (jnp.sum(log_w, 0, keepdims=True) - log_w) / (k - 1)  # [K, B] mean of the others
    others = jnp.where(jnp.eye(k, dtype=bool)[:, :, None], geometric[:, None], log_w[None])  # [K(j), K, B]
    return jax.nn.logsumexp(others, axis=1) - math.log(k)


def vimco(nets, stats, x, key, settings):
    """VIMCO (Mnih & Rezende 2016), K > 1:
    ∇_λ L̂ ≈ Σ_j [L̂ − L̂_{−j} − w̃_j] ∇_λ log q(h_j|x), L̂_{−j} the bound with w_j replaced by the
    geometric mean of the others (`_leave_one_out_bounds`); −w̃_j ∇ log q is ∇_λ of L̂ through log w_j."""
    _, log_p, log_q, log_w = _draw(nets, x, key, settings.num_samples)
    bound = objectives.log_mean_exp(log_w)  # [B]
    signal = bound - _leave_one_out_bounds(log_w) - jax.nn.softmax(log_w, axis=0)  # [K, B]
    surrogate = -jnp.mean(jnp.sum(signal * log_q, 0))
    return _generative_loss(log_p, log_w) + surrogate, (stats, _bound_metrics(log_w))


def _trajectory(conditionals, x, key, num_samples, flipped=None):
    """h ~ q(h|x) layer by layer from 24-bit uniforms u_l (`fires`), the layer `flipped` drawn from
    1 − u_l instead: its antithetic twin. Every layer's uniforms follow from `key` alone, so two
    trajectories differ only from the flipped layer on. -> hidden [h_1, …], logits [a_1, …], each [K, B, size]."""
    h, hidden, logits = x, [], []
    for index, conditional in enumerate(conditionals):
        a = conditional(h)
        shape = (num_samples, *a.shape) if index == 0 else a.shape
        bits = jax.random.bits(jax.random.fold_in(key, index), shape, jnp.uint32) >> 8  # 24 bits
        h = fires(2**24 - 1 - bits if index == flipped else bits, jax.nn.sigmoid(a), 24).astype(a.dtype)
        hidden.append(h)
        logits.append(jnp.broadcast_to(a, shape))
    return hidden, logits


def disarm(nets, stats, x, key, settings):
    """DisARM (Dong, Mnih & Tucker 2020), layer by layer as ARM does (Yin & Zhou 2019). Layer l's
    units, q(h_l|h_{l−1}) = Π Bern(σ(a_l)), get an antithetic pair b = 1[u < σ(a_l)], b̃ = 1[1 − u < σ(a_l)]
    given the layers below, each continued upwards with the same uniforms (`_trajectory`), and
    ∂L̂/∂a_l ≈ ½ (f(b) − f(b̃)) (−1)^{b̃} 1[b ≠ b̃] σ(|a_l|), f = L̂ with λ held fixed in log w.
    L̂'s own λ-dependence through log w, −Σ_j w̃_j ∇_λ log q(h_j|x), and θ's ordinary gradient are
    averaged over the L + 1 trajectories (the draw and each layer's twin), each a draw from q."""
    conditionals = nets.recognition.conditionals
    trajectories = [_trajectory(conditionals, x, key, settings.num_samples, flipped)
                    for flipped in [None, *range(len(conditionals))]]
    surrogate, log_ws = 0.0, []
    for hidden, _ in trajectories:
        log_q = nets.recognition.log_prob(x, hidden)
        log_p = nets.generative.log_prob(x, hidden)
        log_w = sg(log_p - log_q)
        log_ws.append(log_w)
        surrogate = surrogate + (_generative_loss(log_p, log_w) - _generative_loss(log_q, log_w)) / len(trajectories)
    f = [objectives.log_mean_exp(log_w) for log_w in log_ws]  # [B] each
    (drawn, logits), twins = trajectories[0], trajectories[1:]
    for layer, (twin, _) in enumerate(twins):
        b, b_tilde = drawn[layer], twin[layer]
        f_difference = (f[0] - f[layer + 1])[:, None]  # [B, 1]
        coefficient = 0.5 * f_difference * (1.0 - 2.0 * b_tilde) * (b != b_tilde) * sg(jax.nn.sigmoid(jnp.abs(logits[layer])))
        surrogate = surrogate - jnp.mean(jnp.sum(coefficient * logits[layer], axis=(0, 2)))
    return surrogate, (stats, _bound_metrics(log_ws[0]))


def _logistic_log_density(z, logits, temperature):
    """Σ_d log density of the binary Concrete's pre-sigmoid value z = (a + log u − log(1−u)) / τ
    (Maddison et al. 2017, Appendix C): log τ + a − τz − 2 log(1 + exp(a − τz)).  [...]"""
    t = logits - temperature * z
    return jnp.sum(math.log(temperature) + t - 2.0 * objectives.softplus(t), axis=-1)


def _relaxed_draw(key, logits, temperature, shape):
    """z = (a + log u − log(1−u)) / τ: reparameterised, differentiable in a."""
    u = jax.random.uniform(key, shape, minval=1e-7, maxval=1.0 - 1e-7)
    return (logits + jnp.log(u) - jnp.log1p(-u)) / temperature


def concrete(nets, stats, x, key, settings):
    """Binary Concrete relaxation (Maddison et al. 2017; Jang et al. 2017): every unit relaxed to
    y = σ(z), z = (a + log u − log(1 − u)) / τ, and both nets descend −log (1/K) Σ_k w̄_k by the
    reparameterisation, w̄ = p̄(x, z) / q̄(z|x) with the logistic densities of z (`_logistic_log_density`):
    τ = `temperature` in q̄, `prior_temperature` in p̄'s layers; x given y_1 stays Bernoulli. The
    training "loss" is this relaxed bound; validation and test measure the discrete model."""
    recognition, generative = nets.recognition, nets.generative
    h, log_q, relaxed = x, 0.0, []
    for index, conditional in enumerate(recognition.conditionals):
        logits = conditional(h)
        shape = (settings.num_samples, *logits.shape) if index == 0 else logits.shape
        z = _relaxed_draw(jax.random.fold_in(key, index), logits, settings.temperature, shape)
        log_q = log_q + _logistic_log_density(z, logits, settings.temperature)
        relaxed.append(z)
        h = jax.nn.sigmoid(z)
    top = relaxed[-1]
    log_p = _logistic_log_density(top, jnp.broadcast_to(generative.prior_logits[...], top.shape),
                                  settings.prior_temperature)
    above = top
    for conditional, z in zip(generative.chain.conditionals[:-1], reversed(relaxed[:-1])):
        log_p = log_p + _logistic_log_density(z, conditional(jax.nn.sigmoid(above)), settings.prior_temperature)
        above = z
    log_p = log_p + objectives.bernoulli_log_likelihood(x, generative.chain.conditionals[-1](jax.nn.sigmoid(above)))
    log_w = log_p - log_q  # [K, B]
    loss = -jnp.mean(objectives.log_mean_exp(log_w))
    return loss, (stats, {"loss": loss, "neg_elbo": -jnp.mean(log_w)})


class Estimator(NamedTuple):
    estimate: object  # the function above
    min_samples: int  # the fewest samples K it works with
    max_samples: int | None  # the most (None: any)
    baselines: bool  # whether it trains a baseline net per layer (ψ)


ESTIMATORS = {
    "reinforce": Estimator(reinforce, 1, 1, False),
    "nvil": Estimator(nvil, 1, 1, True),
    "vimco": Estimator(vimco, 2, None, False),
    "disarm": Estimator(disarm, 1, None, False),
    "concrete": Estimator(concrete, 1, None, False),
}

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


def disarm(nets, stats, x, key, settings):
    """DisARM (Dong, Mnih & Tucker 2020), one stochastic layer, q(h|x) = Π Bern(σ(a)), a = a_λ(x):
    for each of the K·H units an antithetic pair b = 1[u < σ(a)], b̃ = 1[1 − u < σ(a)], and
    ∂L̂/∂a ≈ ½ (f(b) − f(b̃)) (−1)^{b̃} 1[b ≠ b̃] σ(|a|), f = L̂ with λ held fixed in log w;
    plus L̂'s own λ-dependence through log w, −½ Σ_j [w̃_j(b) ∇ log q(b_j|x) + w̃_j(b̃) ∇ log q(b̃_j|x)]
    (mean zero for K = 1). θ gets the ordinary gradient, averaged over the pair."""
    logits = nets.recognition.conditionals[0](x)  # [B, H]
    bits = jax.random.bits(key, (settings.num_samples, *logits.shape), jnp.uint32) >> 8  # [K, B, H] on 24 bits
    probabilities = jax.nn.sigmoid(logits)
    pair = [fires(bits, probabilities, 24), fires(2**24 - 1 - bits, probabilities, 24)]  # b, b̃
    halves = []
    for b in pair:
        h = b.astype(logits.dtype)
        log_q = objectives.bernoulli_log_likelihood(h, logits)  # [K, B]
        log_p = nets.generative.log_prob(x, [h])
        halves.append((h, log_p, log_q, sg(log_p - log_q)))
    (_, _, _, log_w), (h_tilde, _, _, log_w_tilde) = halves
    f_difference = objectives.log_mean_exp(log_w) - objectives.log_mean_exp(log_w_tilde)  # [B]
    sign = 1.0 - 2.0 * h_tilde  # (−1)^{b̃}
    coefficient = 0.5 * f_difference[:, None] * sign * (pair[0] != pair[1]) * sg(jax.nn.sigmoid(jnp.abs(logits)))
    surrogate = -jnp.mean(jnp.sum(coefficient * logits, axis=(0, 2)))
    for _, log_p, log_q, log_w_half in halves:
        surrogate = surrogate + 0.5 * (_generative_loss(log_p, log_w_half) - _generative_loss(log_q, log_w_half))
    return surrogate, (stats, _bound_metrics(log_w))


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
    one_layer: bool  # whether it handles only one stochastic layer
    baselines: bool  # whether it trains a baseline net per layer (ψ)


ESTIMATORS = {
    "reinforce": Estimator(reinforce, 1, 1, False, False),
    "nvil": Estimator(nvil, 1, 1, False, True),
    "vimco": Estimator(vimco, 2, None, False, False),
    "disarm": Estimator(disarm, 1, None, True, False),
    "concrete": Estimator(concrete, 1, None, False, False),
}

"""Score-function estimators: ∇_λ E_q[f] = E_q[f ∇_λ log q], with baselines that leave it unbiased."""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dgm_cli import objectives
from dgm_cli.nets import MLP
from dgm_cli.estimators.base import bound_metrics, draw, generative_loss, running, sg, update


def reinforce(nets, stats, x, key, settings):
    """Score function with a running-mean baseline (K = 1):
    ∇_λ L ≈ (l − b) ∇_λ log q(h|x), l = log p(x,h) − log q(h|x), b the running mean of l.
    (∇_λ l = −∇_λ log q has mean zero and is left out, as is usual.)"""
    _, log_p, log_q, log_w = draw(nets, x, key, 1)
    mean, _ = running(stats, settings.baseline_decay)
    signal = log_w[0] - mean[0]  # [B]
    surrogate = -jnp.mean(signal * log_q[0])
    batch_mean = jnp.mean(log_w[0])
    stats = update(stats, settings.baseline_decay, stats["mean"].at[0].set(batch_mean), stats["var"])
    return generative_loss(log_p, log_w) + surrogate, (stats, bound_metrics(log_w))


def baseline_nets(recognition, sizes, hidden, activation, settings, rngs):
    """ψ of nvil: C_ψi(h_{i−1}), from the layer below each stochastic layer to a number."""
    return nnx.List([MLP([size, *hidden, 1], activation, rngs=rngs) for size in sizes[:-1]])


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
    mean, var = running(stats, settings.baseline_decay)
    centred = local - sg(predicted)  # [L, B]
    signal = sg((centred - mean[:, None]) / jnp.maximum(1.0, jnp.sqrt(var))[:, None])
    surrogate = -jnp.mean(jnp.sum(signal * jnp.stack(log_q_terms), 0))
    baseline_loss = jnp.mean(jnp.sum(jnp.square(local - mean[:, None] - predicted), 0))
    stats = update(stats, settings.baseline_decay, jnp.mean(centred, 1), jnp.var(centred, 1))
    log_p, log_w = sum(log_p_terms)[None], local[:1]  # l_1 = log w, [1, B]
    metrics = {**bound_metrics(log_w), "baseline_loss": baseline_loss}
    return generative_loss(log_p, log_w) + surrogate + baseline_loss, (stats, metrics)


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
    _, log_p, log_q, log_w = draw(nets, x, key, settings.num_samples)
    bound = objectives.log_mean_exp(log_w)  # [B]
    signal = bound - _leave_one_out_bounds(log_w) - jax.nn.softmax(log_w, axis=0)  # [K, B]
    surrogate = -jnp.mean(jnp.sum(signal * log_q, 0))
    return generative_loss(log_p, log_w) + surrogate, (stats, bound_metrics(log_w))


def rloo(nets, stats, x, key, settings):
    """Leave-one-out REINFORCE (Kool, van Hoof & Welling 2019; Salimans & Knowles 2014), K ≥ 2 draws
    on the ELBO: ∇_λ ELBO ≈ (1/K) Σ_k (l_k − (1/(K−1)) Σ_{j≠k} l_j) ∇_λ log q(h_k|x), l_k = log w_k,
    and θ gets (1/K) Σ_k ∇_θ log p(x, h_k). Unbiased for the ELBO averaged over the K draws, not for
    VIMCO's K-sample bound: the K draws lower the variance, not the bound. (∇_λ l_k = −∇_λ log q has
    mean zero and is left out, as in `reinforce`.)"""
    _, log_p, log_q, log_w = draw(nets, x, key, settings.num_samples)
    others = (jnp.sum(log_w, 0, keepdims=True) - log_w) / (log_w.shape[0] - 1)  # [K, B]
    surrogate = -jnp.mean(jnp.mean((log_w - others) * log_q, 0))
    neg_elbo = -jnp.mean(log_w)
    return -jnp.mean(log_p) + surrogate, (stats, {"loss": neg_elbo, "neg_elbo": neg_elbo})

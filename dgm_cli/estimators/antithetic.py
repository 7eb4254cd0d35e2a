"""Antithetic estimators: each layer's draw and its twin from the mirrored uniforms, as ARM pairs them."""

import jax
import jax.numpy as jnp

from dgm_cli import objectives
from dgm_cli.estimators.base import bound_metrics, generative_loss, sg, trajectory

def _antithetic(nets, x, key, settings, coefficient):
    """The estimate that pairs, for each layer l of q(h_l|h_{l−1}) = Π Bern(σ(a_l)), the draw
    b = 1[u < σ(a_l)] with its twin b̃ = 1[1 − u < σ(a_l)] = 1[u > σ(−a_l)] given the layers below,
    each continued upwards with the same uniforms (`base.trajectory`); `coefficient(f(b) − f(b̃), b, b̃, a_l, u)`
    is the estimator's ∂L̂/∂a_l, f = L̂ with λ held fixed in log w. L̂'s own λ-dependence through
    log w, −Σ_j w̃_j ∇_λ log q(h_j|x), and θ's ordinary gradient are averaged over the L + 1
    trajectories (the draw and each layer's twin), each a draw from q."""
    trajectories = [trajectory(nets.recognition, x, key, settings.num_samples, flipped)
                    for flipped in [None, *range(len(nets.recognition.conditionals))]]
    surrogate, log_ws = 0.0, []
    for hidden, _, _ in trajectories:
        log_q = nets.recognition.log_prob(x, hidden)
        log_p = nets.generative.log_prob(x, hidden)
        log_w = sg(log_p - log_q)
        log_ws.append(log_w)
        surrogate = surrogate + (generative_loss(log_p, log_w) - generative_loss(log_q, log_w)) / len(trajectories)
    f = [objectives.log_mean_exp(log_w) for log_w in log_ws]  # [B] each
    (drawn, logits, uniforms), twins = trajectories[0], trajectories[1:]
    for layer, (twin, _, _) in enumerate(twins):
        f_difference = (f[0] - f[layer + 1])[:, None]  # [B, 1]
        gradient = sg(coefficient(f_difference, drawn[layer], twin[layer], logits[layer], uniforms[layer]))
        surrogate = surrogate - jnp.mean(jnp.sum(gradient * logits[layer], axis=(0, 2)))
    return surrogate, bound_metrics(log_ws[0])


def arm(nets, stats, x, key, settings):
    """ARM (Yin & Zhou 2019), layer by layer (`_antithetic`):
    ∂L̂/∂a_l ≈ (f(1[u > σ(−a_l)]) − f(1[u < σ(a_l)])) (u − ½) = −(f(b) − f(b̃)) (u − ½).
    Unbiased; DisARM below has the same pair and never more variance."""
    def coefficient(f_difference, b, b_tilde, logits, u):
        return -f_difference * (u - 0.5)

    surrogate, metrics = _antithetic(nets, x, key, settings, coefficient)
    return surrogate, (stats, metrics)


def disarm(nets, stats, x, key, settings):
    """DisARM (Dong, Mnih & Tucker 2020), ARM's pair with u integrated out given (b, b̃) (`_antithetic`):
    ∂L̂/∂a_l ≈ ½ (f(b) − f(b̃)) (−1)^{b̃} 1[b ≠ b̃] σ(|a_l|)."""
    def coefficient(f_difference, b, b_tilde, logits, u):
        return 0.5 * f_difference * (1.0 - 2.0 * b_tilde) * (b != b_tilde) * jax.nn.sigmoid(jnp.abs(logits))

    surrogate, metrics = _antithetic(nets, x, key, settings, coefficient)
    return surrogate, (stats, metrics)

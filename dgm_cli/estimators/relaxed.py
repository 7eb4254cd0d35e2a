"""Relaxed and straight-through estimators: the units made continuous (concrete), or kept discrete
in the forward pass with a continuous stand-in for their derivative (straight_through, gumbel_st,
reinmax): biased all, and cheap, one pass and its gradient."""

import math

import jax
import jax.numpy as jnp

from dgm_cli import objectives
from dgm_cli.estimators.base import bound_metrics, sg, trajectory


def logistic_log_density(z, logits, temperature):
    """Σ_d log density of the binary Concrete's pre-sigmoid value z = (a + log u − log(1−u)) / τ
    (Maddison et al. 2017, Appendix C): log τ + a − τz − 2 log(1 + exp(a − τz)).  [...]"""
    t = logits - temperature * z
    return jnp.sum(math.log(temperature) + t - 2.0 * objectives.softplus(t), axis=-1)


def relaxed_draw(key, logits, temperature, shape):
    """z = (a + log u − log(1−u)) / τ: reparameterised, differentiable in a."""
    u = jax.random.uniform(key, shape, minval=1e-7, maxval=1.0 - 1e-7)
    return (logits + jnp.log(u) - jnp.log1p(-u)) / temperature


def concrete(nets, stats, x, key, settings):
    """Binary Concrete relaxation (Maddison et al. 2017; Jang et al. 2017): every unit relaxed to
    y = σ(z), z = (a + log u − log(1 − u)) / τ, and both nets descend −log (1/K) Σ_k w̄_k by the
    reparameterisation, w̄ = p̄(x, z) / q̄(z|x) with the logistic densities of z (`logistic_log_density`):
    τ = `temperature` in q̄, `prior_temperature` in p̄'s layers; x given y_1 stays Bernoulli. The
    training "loss" is this relaxed bound; validation and test measure the discrete model."""
    recognition, generative = nets.recognition, nets.generative
    h, log_q, relaxed = x, 0.0, []
    for index, conditional in enumerate(recognition.conditionals):
        logits = conditional(h)
        shape = (settings.num_samples, *logits.shape) if index == 0 else logits.shape
        z = relaxed_draw(jax.random.fold_in(key, index), logits, settings.temperature, shape)
        log_q = log_q + logistic_log_density(z, logits, settings.temperature)
        relaxed.append(z)
        h = jax.nn.sigmoid(z)
    top = relaxed[-1]
    log_p = logistic_log_density(top, jnp.broadcast_to(generative.prior_logits[...], top.shape),
                                  settings.prior_temperature)
    above = top
    for conditional, z in zip(generative.chain.conditionals[:-1], reversed(relaxed[:-1])):
        log_p = log_p + logistic_log_density(z, conditional(jax.nn.sigmoid(above)), settings.prior_temperature)
        above = z
    log_p = log_p + objectives.bernoulli_log_likelihood(x, generative.chain.conditionals[-1](jax.nn.sigmoid(above)))
    log_w = log_p - log_q  # [K, B]
    loss = -jnp.mean(objectives.log_mean_exp(log_w))
    return loss, (stats, {"loss": loss, "neg_elbo": -jnp.mean(log_w)})


def _straight_through(nets, x, key, settings, slope):
    """Every unit's draw b passed on as h = b + s (a − sg(a)), s = sg(slope(b, a, u)): the value b,
    the derivative ∂h/∂a = s (`base.trajectory`'s `unit`), so that the layers above, log p(x, h) and
    log q(h|x) are differentiated through h. Both nets descend −L̂ so differentiated; θ's gradient is
    the ordinary one, λ's is biased wherever L̂ is not linear in h."""
    def unit(b, a, u):
        return b + sg(slope(b, a, u)) * (a - sg(a))

    hidden, _, _ = trajectory(nets.recognition.conditionals, x, key, settings.num_samples, unit=unit)
    log_w = nets.generative.log_prob(x, hidden) - nets.recognition.log_prob(x, hidden)  # [K, B]
    return -jnp.mean(objectives.log_mean_exp(log_w)), bound_metrics(sg(log_w))


def straight_through(nets, stats, x, key, settings):
    """Straight-through (Bengio, Léonard & Courville 2013), the sigmoid variant: ∂h/∂a = σ'(a) = σ(a) σ(−a),
    the derivative of E[b] = σ(a). Exact when L̂ is linear in every h; biased otherwise."""
    def slope(b, a, u):
        return jax.nn.sigmoid(a) * jax.nn.sigmoid(-a)

    surrogate, metrics = _straight_through(nets, x, key, settings, slope)
    return surrogate, (stats, metrics)


def gumbel_st(nets, stats, x, key, settings):
    """Straight-through Gumbel (binary Concrete; Jang, Gu & Poole 2017): ∂h/∂a = ∂y/∂a of the relaxed
    y = σ(z/τ), z = a + log(1 − u) − log u the logistic variable behind b = 1[z > 0], τ = `temperature`:
    σ(z/τ) σ(−z/τ) / τ. Biased even when L̂ is linear in h: E[∂y/∂a] ≠ σ'(a)."""
    def slope(b, a, u):
        y = (a + jnp.log1p(-u) - jnp.log(u)) / settings.temperature
        return jax.nn.sigmoid(y) * jax.nn.sigmoid(-y) / settings.temperature

    surrogate, metrics = _straight_through(nets, x, key, settings, slope)
    return surrogate, (stats, metrics)


def reinmax(nets, stats, x, key, settings):
    """ReinMax (Liu et al. 2023), the binary unit as two categories: Heun's method in place of
    straight-through's Euler step, ∂h/∂a = 2 π₁(1 − π₁) − ½ σ(a) σ(−a), π₁ = ½ (b + σ(a/τ)),
    τ = `temperature` (≥ 1 in the paper). With τ = 1 exact when L̂ is linear in h (E[π₁(1 − π₁)]
    = ¾ σ'(a)), and second-order accurate beyond that; still biased."""
    def slope(b, a, u):
        pi_1 = 0.5 * (b + jax.nn.sigmoid(a / settings.temperature))
        return 2.0 * pi_1 * (1.0 - pi_1) - 0.5 * jax.nn.sigmoid(a) * jax.nn.sigmoid(-a)

    surrogate, metrics = _straight_through(nets, x, key, settings, slope)
    return surrogate, (stats, metrics)

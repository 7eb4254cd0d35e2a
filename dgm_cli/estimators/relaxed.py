"""Relaxed and straight-through estimators: the units made continuous (concrete), or kept discrete
in the forward pass with a continuous stand-in for their derivative (straight_through, gumbel_st,
reinmax): biased all, and cheap, one pass and its gradient."""

import jax
import jax.numpy as jnp

from dgm_cli import objectives
from dgm_cli.estimators.base import bound_metrics, sg, trajectory


def concrete(nets, stats, x, key, settings):
    """The Concrete relaxation (Maddison et al. 2017; Jang et al. 2017's Gumbel-softmax for categorical
    units): every unit relaxed, binary ones to y = σ(s), s = (a + log u − log(1 − u)) / τ, categorical
    ones to y = exp(s), s = log softmax((a + Gumbel noise) / τ), and both nets descend
    −log (1/K) Σ_k w̄_k by the reparameterisation, w̄ = p̄(x, s) / q̄(s|x) with the densities of s
    (`dgm_cli.units`: logistic, ExpConcrete): τ = `temperature` in q̄, `prior_temperature` in p̄'s
    layers; x given y_1 stays Bernoulli. The training "loss" is this relaxed bound; validation and
    test measure the discrete model."""
    recognition, generative = nets.recognition, nets.generative
    h, log_q, relaxed = x, 0.0, []
    for index, (conditional, units) in enumerate(zip(recognition.conditionals, recognition.units)):
        logits = conditional(h)
        shape = (settings.num_samples, *logits.shape) if index == 0 else logits.shape
        s = units.concrete_draw(jax.random.fold_in(key, index), logits, settings.temperature, shape)
        log_q = log_q + units.concrete_log_density(s, logits, settings.temperature)
        relaxed.append(s)
        h = units.concrete_value(s)
    units, top = generative.units, relaxed[-1]
    log_p = units.concrete_log_density(top, jnp.broadcast_to(generative.prior_logits[...], top.shape),
                                       settings.prior_temperature)
    above = top
    for conditional, s in zip(generative.chain.conditionals[:-1], reversed(relaxed[:-1])):
        log_p = log_p + units.concrete_log_density(s, conditional(units.concrete_value(above)),
                                                   settings.prior_temperature)
        above = s
    log_p = log_p + objectives.bernoulli_log_likelihood(x, generative.chain.conditionals[-1](units.concrete_value(above)))
    log_w = log_p - log_q  # [K, B]
    loss = -jnp.mean(objectives.log_mean_exp(log_w))
    return loss, (stats, {"loss": loss, "neg_elbo": -jnp.mean(log_w)})


def _straight_through(nets, x, key, settings, stand_in):
    """Every unit's draw b passed on as h = b + (s − sg(s)), s = stand_in(units, b, a, u) a
    differentiable function of the logits a: the value b, the derivative ∂h/∂a = ∂s/∂a
    (`base.trajectory`'s `unit`), so that the layers above, log p(x, h) and log q(h|x) are
    differentiated through h. Both nets descend −L̂ so differentiated; θ's gradient is the ordinary
    one, λ's is biased wherever L̂ is not linear in h."""
    units = nets.recognition.units[0]  # every hidden layer has the same units

    def unit(b, a, u):
        s = stand_in(units, b, a, u)
        return b + (s - sg(s))

    hidden, _, _ = trajectory(nets.recognition, x, key, settings.num_samples, unit=unit)
    log_w = nets.generative.log_prob(x, hidden) - nets.recognition.log_prob(x, hidden)  # [K, B]
    return -jnp.mean(objectives.log_mean_exp(log_w)), bound_metrics(sg(log_w))


def straight_through(nets, stats, x, key, settings):
    """Straight-through (Bengio, Léonard & Courville 2013), the sigmoid (softmax) variant: s = E[b] =
    σ(a) (softmax(a)), so ∂h/∂a = σ'(a) (the softmax's Jacobian). Exact when L̂ is linear in every h;
    biased otherwise."""
    def stand_in(units, b, a, u):
        return units.relax(a, 1.0)

    surrogate, metrics = _straight_through(nets, x, key, settings, stand_in)
    return surrogate, (stats, metrics)


def gumbel_st(nets, stats, x, key, settings):
    """Straight-through Gumbel (Jang, Gu & Poole 2017): s = the relaxed unit at the noise behind b,
    σ((a + logistic noise)/τ) or softmax((a + Gumbel noise)/τ), τ = `temperature`; for a binary unit
    ∂h/∂a = σ(z/τ) σ(−z/τ) / τ. Biased even when L̂ is linear in h: E[∂s/∂a] ≠ σ'(a)."""
    def stand_in(units, b, a, u):
        return units.relax(a + units.noise(u), settings.temperature)

    surrogate, metrics = _straight_through(nets, x, key, settings, stand_in)
    return surrogate, (stats, metrics)


def reinmax(nets, stats, x, key, settings):
    """ReinMax (Liu et al. 2023; a binary unit as two categories): Heun's method in place of
    straight-through's Euler step, s = 2 π₁ − ½ π₀ with π₀ = softmax(a) and π₁ = ½ (b + softmax(a/τ))
    whose Jacobian is that of a softmax at π₁, τ = `temperature` (≥ 1 in the paper): for a binary unit
    ∂h/∂a = 2 π₁(1 − π₁) − ½ σ'(a). With τ = 1 exact when L̂ is linear in h (E[J(π₁)] = ¾ J(π₀)),
    and second-order accurate beyond that; still biased."""
    def stand_in(units, b, a, u):
        pi_0 = units.relax(a, 1.0)
        pi_1 = 0.5 * (b + units.relax(a, settings.temperature))
        pi_1 = units.relax(a + sg(units.logits_of(pi_1) - a), 1.0)  # the value π₁, the Jacobian at π₁
        return 2.0 * pi_1 - 0.5 * pi_0

    surrogate, metrics = _straight_through(nets, x, key, settings, stand_in)
    return surrogate, (stats, metrics)

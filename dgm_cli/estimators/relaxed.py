"""Relaxed estimators: the units made continuous, so that both nets descend by reparameterisation."""

import math

import jax
import jax.numpy as jnp

from dgm_cli import objectives


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

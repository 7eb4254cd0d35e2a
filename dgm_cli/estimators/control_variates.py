"""Learned control variates: REINFORCE less a relaxed copy of the objective, its parameters trained
to minimise the estimator's variance (REBAR, RELAX).

Every layer's draw b is the argmax of its logits plus noise (`dgm_cli.units`: b = 1[u < σ(a)] is
the sign of z = a + log(1 − u) − log u; a categorical draw the argmax of a + Gumbel noise). A
control variate c(u) built from the relaxed units y = σ(z/τ) (softmax(z/τ)) has the
reparameterised gradient E[∇c(u)]; and, drawing the noise again given b (ũ, tied to u: the same
value, written as a function of the hard chain's logits, as Tucker et al.'s code does),
E[∇c(u)] = E[c(ũ) ∇ log q(b)] + E[∇c(ũ)]. So

    ĝ = ∇_λ [f(b) log q(b) − Σ_k w̃_k log q(b_k)] + η ⊙ ∇_λ [c(u) − c(ũ) − sg_λ(c(ũ)) log q(b)]

is unbiased for ∇_λ E[L̂] for any η and any c (f = L̂ at the draw; the second term of the first
bracket is L̂'s own λ-dependence through log w; sg_λ holds c(ũ) fixed for λ, not for φ). η holds one scale per parameter array of q, and
the control variate's parameters φ (η, log τ, relax's residual net) descend the estimator's
variance, Σ ĝ² (E[ĝ] does not depend on φ), by differentiating through ĝ (second order, in one
jitted step). All layers are relaxed together; θ gets the ordinary gradient.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dgm_cli import objectives
from dgm_cli.estimators.base import bound_metrics, generative_loss, sg, trajectory
from dgm_cli.nets import MLP


class RelaxedControl(nnx.Module):
    """φ of rebar and relax: η_i = 2σ(e_i) ∈ (0, 2) for each parameter array of q (1 at the start),
    the relaxation's temperature τ = exp(t), and for relax a residual net r_ρ(x, y) -> a number."""

    def __init__(self, num_arrays: int, temperature: float, residual):
        self.eta_logits = nnx.Param(jnp.zeros(num_arrays))
        self.log_temperature = nnx.Param(jnp.asarray(math.log(temperature)))
        self.residual = residual


def rebar_control(recognition, sizes, hidden, activation, settings, rngs):
    """REBAR (Tucker et al. 2017): the control variate c(u) = L̂ of the binary-Concrete (or
    Gumbel-softmax) relaxation at temperature τ; η and τ learned online to minimise the variance,
    as the paper's dynamic REBAR."""
    return RelaxedControl(len(jax.tree.leaves(recognition)), settings.temperature, None)


def relax_control(recognition, sizes, hidden, activation, settings, rngs):
    """RELAX (Grathwohl et al. 2018): REBAR's structure with a free-form control variate
    c_φ(u) = L̂ of the relaxation + r_ρ(x, y), r_ρ a net (`model.baseline_hidden`); η, τ and ρ
    trained to minimise the variance."""
    residual = MLP([sum(sizes), *hidden, 1], activation, rngs=rngs)  # r_ρ of x and every layer's y
    return RelaxedControl(len(jax.tree.leaves(recognition)), settings.temperature, residual)


def _relaxed_objective(generative, recognition, control, x, noises):
    """c: L̂ of the relaxed units y_l = relax(a_l + noise_l, τ) (σ or softmax), each layer's logits
    from the relaxed layer below, their log-probabilities read at y; plus relax's r_ρ(x, y)
    averaged over K. [B]"""
    temperature = jnp.exp(control.log_temperature[...])
    h, log_q, relaxed = x, 0.0, []
    for conditional, units, noise in zip(recognition.conditionals, recognition.units, noises):
        a = conditional(h)
        h = units.relax(a + noise, temperature)
        log_q = log_q + units.log_prob(h, a)
        relaxed.append(h)
    c = objectives.log_mean_exp(generative.log_prob(x, relaxed) - log_q)
    if control.residual is not None:
        inputs = jnp.concatenate([jnp.broadcast_to(x, relaxed[0].shape[:-1] + x.shape[-1:]), *relaxed], -1)
        c = c + jnp.mean(control.residual(inputs)[..., 0], 0)
    return c


def _controlled(nets, x, key, settings):
    hidden, _, uniforms = trajectory(nets.recognition, x, key, settings.num_samples)
    units = nets.recognition.units
    log_p = nets.generative.log_prob(x, hidden)
    log_w = sg(log_p - nets.recognition.log_prob(x, hidden))  # [K, B]
    f = objectives.log_mean_exp(log_w)  # [B]
    generative, recognition = sg(nets.generative), sg(nets.recognition)

    def log_q_and_logits(recognition):  # Σ_k log q(b_k|x) [B] and the hard chain's logits
        logits = [conditional(h) for conditional, h in zip(recognition.conditionals, [x, *hidden[:-1]])]
        log_q = sum(unit.log_prob(b, a) for unit, b, a in zip(units, hidden, logits))  # [K, B]
        return log_q, logits

    def score(recognition):
        log_q, _ = log_q_and_logits(recognition)
        return jnp.mean(f * jnp.sum(log_q, 0) - jnp.sum(jax.nn.softmax(log_w, 0) * log_q, 0))

    def control_variate(recognition, control):
        log_q, logits = log_q_and_logits(recognition)
        noises = [unit.noise(u) for unit, u in zip(units, uniforms)]
        tied = [unit.tied_noise(u, b, a) for unit, u, b, a in zip(units, uniforms, hidden, logits)]
        c = _relaxed_objective(generative, recognition, control, x, noises)
        c_tied = _relaxed_objective(generative, recognition, control, x, tied)
        # −c(ũ) ∇_λ log q(b) as the λ-gradient of −c(ũ) (log q − sg(log q)), zero in value: c(ũ) stays
        # a function of φ (Σ ĝ² depends on φ through it too), and no third pass holds it fixed for λ.
        log_q = jnp.sum(log_q, 0)
        return jnp.mean(c - c_tied - c_tied * (log_q - sg(log_q)))

    score_gradient = jax.grad(score)(recognition)
    arrays = jax.tree.structure(score_gradient)

    def estimate(control):  # ĝ, and Σ ĝ² (the variance, up to E[ĝ]², which φ does not move)
        eta = arrays.unflatten(list(2.0 * jax.nn.sigmoid(control.eta_logits[...])))
        g = jax.tree.map(lambda s, c, e: s + e * c, score_gradient, jax.grad(control_variate)(recognition, control), eta)
        return sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(g)), g

    (variance, g), variance_gradient = jax.value_and_grad(estimate, has_aux=True)(sg(nets.baselines))
    # Surrogates linear in λ and φ whose gradients are −ĝ and ∇_φ Σ ĝ²; θ's is the ordinary one.
    surrogate = (generative_loss(log_p, log_w) - _inner(g, nets.recognition)
                 + _inner(variance_gradient, nets.baselines))
    metrics = {**bound_metrics(log_w), "temperature": jnp.exp(nets.baselines.log_temperature[...]),
               "variance_objective": variance}
    return surrogate, metrics


def _inner(gradient, module):
    """Σ sg(gradient) · parameters: a surrogate whose gradient is `gradient`."""
    return sum(jnp.sum(sg(g) * p) for g, p in zip(jax.tree.leaves(gradient), jax.tree.leaves(module), strict=True))


def controlled(nets, stats, x, key, settings):
    """REINFORCE less the learned control variate `nets.baselines` holds (`_controlled`): REBAR's
    or RELAX's, as its factory built it. Unbiased."""
    surrogate, metrics = _controlled(nets, x, key, settings)
    return surrogate, (stats, metrics)

"""Refined inference: q fitted to each example on its own, the amortisation taken away.

An amortised q(z|x) computes every example's posterior with the same weights; the best member
of q's family for one x alone, q*, has an ELBO L[q*] ≥ L[q]. Here q* is q with per-example local
parameters (the model's `local_offsets`: a shift of each layer's Gaussian mean and log-variance,
or of each layer's Bernoulli or categorical logits), zero at the start, climbed by Adam on the
model's `refinement_objective` (reparameterised for Gaussian latents, leave-one-out REINFORCE
for discrete ones). Cremer, Li & Duvenaud (2018) split log p(x) − L[q] so: the approximation gap
log p(x) − L[q*] and the amortisation gap L[q*] − L[q]. q* is also a better proposal for
importance sampling (`eval.refine_steps`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class Settings(NamedTuple):
    steps: int  # Adam steps per example
    learning_rate: float
    samples: int  # draws from q* per step for the gradient estimate


def refine(model, state, x, key, settings: Settings):
    """-> the local parameters of q* for x [B, D], and the ELBO estimate of each step [steps, B]
    (every example climbs on its own: the objective is a sum over them, and Adam scales each
    parameter by its own history)."""
    offsets = model.local_offsets(state, x)
    optimizer = optax.adam(settings.learning_rate)

    def step(carry, key):
        offsets, optimizer_state = carry

        def loss(offsets):
            surrogate, elbo = model.refinement_objective(state, x, offsets, key, settings.samples)
            return -jnp.sum(surrogate), elbo

        gradient, elbo = jax.grad(loss, has_aux=True)(offsets)
        updates, optimizer_state = optimizer.update(gradient, optimizer_state, offsets)
        return (optax.apply_updates(offsets, updates), optimizer_state), elbo

    (offsets, _), curve = jax.lax.scan(step, (offsets, optimizer.init(offsets)), jax.random.split(key, settings.steps))
    return offsets, curve

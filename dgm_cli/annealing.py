"""Annealed importance sampling (Neal 2001), a second yardstick of log p(x): from q(z|x) to p(x, z).

The intermediate targets are π_t(z) ∝ q(z|x)^(1−β_t) p(x, z)^β_t, with 0 = β_0 < β_1 < … < β_T = 1
on a sigmoidal schedule (Grosse et al. 2013; Wu et al. 2017). Each of C chains starts at z_0 ~ q(z|x)
and takes one transition that leaves π_t invariant at each t = 1 … T − 1; its weight is

    log w = Σ_{t=1..T} (β_t − β_{t−1}) [log p(x, z_{t−1}) − log q(z_{t−1}|x)],

and log p̂(x) = log (1/C) Σ_c w_c, whose mean over draws is p(x): like importance sampling, a
stochastic lower bound of log p(x) in log, but one that stays tight when q is poor, given enough
steps. T = 1 is importance sampling from q with C samples. The transitions: Hamiltonian Monte
Carlo for continuous latents (leapfrog steps, the step size of each chain adapted towards a
target acceptance rate, as Wu et al. do), single-site Gibbs sweeps for discrete ones (the model's
own `gibbs_sweep`, which knows its units).

A model offers AIS through `annealing_path(state, x) -> Path` for a batch x [B, D].
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

SCHEDULE_SHARPNESS = 4.0  # δ of the sigmoidal schedule: β ∝ σ(δ (2t/T − 1)), rescaled to [0, 1]
STEP_SIZE_CHANGE = 1.02  # × or ÷ per transition, as the acceptance is above or below its target
STEP_SIZE_RANGE = (1e-4, 0.5)


class Path(NamedTuple):
    """What AIS needs of a model, for one batch x [B, D]; latents z are pytrees of [C, B, …] arrays."""

    draw: Callable  # (key, chains) -> z ~ q(z|x)
    log_densities: Callable  # z -> (log p(x, z), log q(z|x)), each [C, B]
    gibbs_sweep: Callable | None = None  # (z, β, key) -> z, leaving π_β invariant: discrete latents


class Settings(NamedTuple):
    steps: int  # T, the intermediate distributions
    chains: int  # C, per image
    leapfrog_steps: int  # of each HMC transition
    step_size: float  # HMC's initial step size
    target_acceptance: float  # HMC's step size rises while the acceptance rate is above it, falls below


def schedule(steps: int) -> jax.Array:
    """β_0 … β_T [T + 1], from 0 to 1, sigmoidal: the steps dense at both ends, where the targets
    change fastest in log-density."""
    if steps == 1:
        return jnp.asarray([0.0, 1.0])
    t = jnp.linspace(-1.0, 1.0, steps + 1)
    beta = jax.nn.sigmoid(SCHEDULE_SHARPNESS * t)
    return (beta - beta[0]) / (beta[-1] - beta[0])


def _hmc(log_target, z, log_p, log_q, beta, step_size, key, leapfrog_steps):
    """One HMC transition of every chain at once, leaving exp(log_target) invariant: momenta
    ~ N(0, I), `leapfrog_steps` leapfrog steps of `step_size` [C, B] each, then Metropolis
    acceptance. -> z, its (log p, log q), the acceptance probability [C, B]."""
    def potential(z):  # −log π_β(z) summed over the chains, which are independent: its gradient is each chain's
        log_p, log_q = log_target(z)
        return -jnp.sum((1.0 - beta) * log_q + beta * log_p), (log_p, log_q)

    gradient = jax.grad(potential, has_aux=True)
    momentum_key, accept_key = jax.random.split(key)
    leaves, tree = jax.tree.flatten(z)
    momentum = tree.unflatten([jax.random.normal(k, leaf.shape) for k, leaf in
                               zip(jax.random.split(momentum_key, len(leaves)), leaves)])
    scale = lambda leaf: step_size.reshape(step_size.shape + (1,) * (leaf.ndim - step_size.ndim))
    kinetic = lambda p: sum(0.5 * jnp.sum(jnp.square(leaf), axis=tuple(range(2, leaf.ndim))) for leaf in jax.tree.leaves(p))

    def leapfrog(carry, _):
        position, p, grad = carry
        p = jax.tree.map(lambda p, g: p - 0.5 * scale(p) * g, p, grad)
        position = jax.tree.map(lambda x, p: x + scale(x) * p, position, p)
        grad, densities = gradient(position)
        p = jax.tree.map(lambda p, g: p - 0.5 * scale(p) * g, p, grad)
        return (position, p, grad), densities

    grad, _ = gradient(z)
    (proposal, new_momentum, _), densities = jax.lax.scan(leapfrog, (z, momentum, grad), None, leapfrog_steps)
    new_log_p, new_log_q = jax.tree.map(lambda d: d[-1], densities)
    before = -((1.0 - beta) * log_q + beta * log_p) + kinetic(momentum)
    after = -((1.0 - beta) * new_log_q + beta * new_log_p) + kinetic(new_momentum)
    acceptance = jnp.exp(jnp.minimum(0.0, jnp.nan_to_num(before - after, nan=-jnp.inf)))
    accept = jax.random.uniform(accept_key, acceptance.shape) < acceptance
    pick = lambda new, old: jnp.where(accept.reshape(accept.shape + (1,) * (new.ndim - accept.ndim)), new, old)
    return (jax.tree.map(pick, proposal, z), pick(new_log_p, log_p), pick(new_log_q, log_q), acceptance)


def log_likelihood(path: Path, key, settings: Settings):
    """AIS for one batch: {"log_p": [B] log p̂(x), "log_ess": [B] log of the chains' effective
    sample size (Σ w)² / Σ w², and by HMC "acceptance": [B] its mean acceptance rate}."""
    betas = schedule(settings.steps)
    draw_key, key = jax.random.split(key)
    z = path.draw(draw_key, settings.chains)
    log_p, log_q = path.log_densities(z)
    step_size = jnp.full(log_p.shape, settings.step_size)

    def transition(carry, inputs):
        z, log_p, log_q, log_w, step_size, accepted = carry
        previous, beta, key = inputs
        log_w = log_w + (beta - previous) * (log_p - log_q)
        if path.gibbs_sweep is not None:
            z = path.gibbs_sweep(z, beta, key)
            log_p, log_q = path.log_densities(z)
            acceptance = jnp.ones_like(log_w)
        else:
            z, log_p, log_q, acceptance = _hmc(path.log_densities, z, log_p, log_q, beta, step_size, key,
                                               settings.leapfrog_steps)
            step_size = jnp.clip(step_size * jnp.where(acceptance > settings.target_acceptance, STEP_SIZE_CHANGE,
                                                       1.0 / STEP_SIZE_CHANGE), *STEP_SIZE_RANGE)
        return (z, log_p, log_q, log_w, step_size, accepted + acceptance), None

    carry = (z, log_p, log_q, jnp.zeros_like(log_p), step_size, jnp.zeros_like(log_p))
    inputs = (betas[:-2], betas[1:-1], jax.random.split(key, settings.steps - 1))  # transitions at β_1 … β_{T−1}
    (z, log_p, log_q, log_w, _, accepted), _ = jax.lax.scan(transition, carry, inputs)
    log_w = log_w + (betas[-1] - betas[-2]) * (log_p - log_q)  # [C, B]
    log_sum = jax.nn.logsumexp(log_w, axis=0)
    found = {"log_p": log_sum - jnp.log(settings.chains), "log_ess": 2 * log_sum - jax.nn.logsumexp(2 * log_w, axis=0)}
    if path.gibbs_sweep is None:
        found["acceptance"] = jnp.mean(accepted, axis=0) / max(1, settings.steps - 1)
    return found

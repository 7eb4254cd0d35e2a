"""The Helmholtz machine's networks, shared by the families that train them (`wakesleep`, `sbn`).

Generative net p(x, h | θ) = p(h_L) Π_l p(h_{l−1} | h_l), with h_0 = x: a sigmoid belief net of
binary units, top prior Π_j Bern(σ(b_j)), each layer Bernoulli given the one above (its logits a
linear map of the layer above, or an MLP through `deterministic_hidden` layers, which p passes in
the reverse order: 784 → 512 → 256 → h in q, h → 256 → 512 → 784 in p). Recognition net
q(h | x, λ) = Π_l q(h_l | h_{l−1}): the mirror image, from the pixels up, a `StochasticChain`.
The hidden units may instead be categorical (`dgm_cli.units`, `model=sbn` only); pixels are binary.

Binary units are drawn by `dgm_cli.bernoulli`: 24-bit draws from q (their log q enters importance
weights), 16-bit dreams for wake-sleep's sleep phase.
"""

from itertools import pairwise

import jax
import jax.numpy as jnp
from flax import nnx

from dgm_cli import annealing, nets, objectives
from dgm_cli.errors import DgmError, positive_ints
from dgm_cli.units import Bernoulli


def network_settings(config):
    """(layers, deterministic_hidden, activation) of a `model` config, checked."""
    layers = positive_ints(config.layers, "model.layers")
    if not layers:
        raise DgmError("model.layers must name at least one layer of hidden units, such as [200]")
    deterministic_hidden = positive_ints(config.deterministic_hidden, "model.deterministic_hidden")
    return layers, deterministic_hidden, nets.activation(config.activation)


class StochasticChain(nnx.Module):
    """Layers of stochastic units, each drawn given the one before: widths[0] -> widths[1] -> …,
    `units[i]` (`dgm_cli.units`) those of the layer widths[i + 1]."""

    def __init__(self, widths, units, deterministic_hidden, activation, *, rngs: nnx.Rngs):
        self.conditionals = nnx.List(
            [nets.MLP([n_in, *deterministic_hidden, n_out], activation, rngs=rngs) for n_in, n_out in pairwise(widths)]
        )
        self.units = tuple(units)

    def sample(self, h, key, num_samples: int | None = None, draw=None, offsets=None):
        """Draw every layer after `h` in turn, `num_samples` times over a new leading axis if given
        (h itself is not repeated: its logits are computed once); binary layers by `draw(key, p, shape)`
        if given; each layer's logits shifted by `offsets[l]` [B, width] if given (a per-example
        refinement of the chain). -> samples, total log-prob."""
        samples, log_prob = [], 0.0
        for index, (conditional, units) in enumerate(zip(self.conditionals, self.units)):
            logits = conditional(h) if offsets is None else conditional(h) + offsets[index]
            shape = (num_samples, *logits.shape) if num_samples and index == 0 else logits.shape
            key_here = jax.random.fold_in(key, index)
            if draw is None:
                h = units.sample(key_here, logits, shape)
            else:
                h = draw(key_here, jax.nn.sigmoid(logits), shape).astype(logits.dtype)
            log_prob = log_prob + units.log_prob(h, logits)
            samples.append(h)
        return samples, log_prob

    def log_prob(self, h, samples):
        """Σ_l log p(samples[l] | the layer before), starting from `h`."""
        return sum(self.layer_log_probs(h, samples))

    def layer_log_probs(self, h, samples):
        """[log p(samples[0] | h), log p(samples[1] | samples[0]), …]: `log_prob` term by term."""
        terms = []
        for conditional, units, sample in zip(self.conditionals, self.units, samples):
            terms.append(units.log_prob(sample, conditional(h)))
            h = sample
        return terms


class Generative(nnx.Module):
    """p(x, h): a factorised prior on the top layer (uniform at the start), then a chain down to the pixels."""

    def __init__(self, data_dim, widths, deterministic_hidden, activation, units, *, rngs: nnx.Rngs):
        self.prior_logits = nnx.Param(jnp.zeros(widths[-1]))
        self.units = units
        self.chain = StochasticChain([*reversed(widths), data_dim], [units] * (len(widths) - 1) + [Bernoulli()],
                                     list(reversed(deterministic_hidden)), activation, rngs=rngs)  # q's mirror

    def _prior(self, top):
        return self.units.log_prob(top, jnp.broadcast_to(self.prior_logits[...], top.shape))

    def log_prob(self, x, hidden):
        """log p(x, h). hidden: [h_1, …, h_L] as q draws them (bottom up), each [..., width_l]."""
        return self._prior(hidden[-1]) + self.chain.log_prob(hidden[-1], [*reversed(hidden[:-1]), x])

    def layer_log_probs(self, x, hidden):
        """[log p(x | h_1), log p(h_1 | h_2), …, log p(h_L)]: `log_prob` term by term, bottom up."""
        top = hidden[-1]
        return [*reversed(self.chain.layer_log_probs(top, [*reversed(hidden[:-1]), x])), self._prior(top)]

    def sample(self, key, n: int, draw=None):
        """Ancestral samples: -> x [n, D] and [h_1, …, h_L] (bottom up); binary layers by `draw` if given."""
        top_key, chain_key = jax.random.split(key)
        shape = (n, self.prior_logits.shape[0])
        logits = jnp.broadcast_to(self.prior_logits[...], shape)
        if draw is None:
            top = self.units.sample(top_key, logits, shape)
        else:
            top = draw(top_key, jax.nn.sigmoid(logits), shape).astype(jnp.float32)
        below, _ = self.chain.sample(top, chain_key, draw=draw)
        return below[-1], [*reversed(below[:-1]), top]

    def pixel_probabilities(self, h_1):
        return jax.nn.sigmoid(self.chain.conditionals[-1](h_1))


def _gibbs_layer(h, units, local, consumers, key):
    """One Gibbs sweep over the variables of one layer h [C, B, W], in order, each drawn from its
    conditional under the annealing target given everything else. `local` [C, B, N, V]: the part
    of each variable's log-conditional that its own conditionals give (under p and under q: the
    logits of this layer, fixed while it is swept); `consumers`: the conditionals that read this
    layer, (MLP, what it predicts, its units, its weight β or 1 − β). Each consumer's first-layer
    output is kept and moved by one kernel row per changed variable, and so is the log-probability
    of what it predicts: a variable costs the rest of each consumer's net once for each value
    other than its current one (once, for a binary unit), not a pass through every layer."""
    values = units.values()  # [V, w]
    count, width = values.shape
    kernels = [mlp.layers[0].kernel[...] for mlp, _, _, _ in consumers]  # [W, H] each
    pres = [mlp.layers[0](h) for mlp, _, _, _ in consumers]  # [C, B, H] each
    fits = [target_units.log_prob(target, mlp.after_first(pre))  # [C, B] each, at the current h
            for (mlp, target, target_units, _), pre in zip(consumers, pres)]

    def update(carry, inputs):
        h, pres, fits = carry
        site, key = inputs
        current = jax.lax.dynamic_slice_in_dim(h, site * width, width, axis=-1)  # [C, B, w]
        index = jnp.argmax(current @ values.T, -1)  # [C, B]: which of the values it holds
        candidates = (index[..., None] + jnp.arange(count)) % count  # [C, B, V], the current value first
        change = values[candidates[..., 1:]] - current[..., None, :]  # [C, B, V − 1, w]: to each other value
        local_site = jax.lax.dynamic_index_in_dim(local, site, axis=-2, keepdims=False)  # [C, B, V]
        score = jnp.take_along_axis(local_site, candidates, -1)
        rows = [jax.lax.dynamic_slice_in_dim(kernel, site * width, width, axis=0) for kernel in kernels]  # [w, H]
        candidate_fits = []
        for (mlp, target, target_units, weight), pre, row, fit in zip(consumers, pres, rows, fits):
            logits = mlp.after_first(pre[..., None, :] + change @ row)  # [C, B, V − 1, out]
            each = jnp.concatenate([fit[..., None], target_units.log_prob(target[..., None, :], logits)], -1)
            score = score + weight * each
            candidate_fits.append(each)
        pick = jax.random.categorical(key, score)[..., None]  # [C, B, 1], of the candidates
        new = values[jnp.take_along_axis(candidates, pick, -1)[..., 0]]  # [C, B, w]
        h = jax.lax.dynamic_update_slice_in_dim(h, new, site * width, axis=-1)
        pres = [pre + (new - current) @ row for pre, row in zip(pres, rows)]
        fits = [jnp.take_along_axis(each, pick, -1)[..., 0] for each in candidate_fits]
        return (h, pres, fits), None

    sites = local.shape[-2]
    (h, _, _), _ = jax.lax.scan(update, (h, pres, fits), (jnp.arange(sites), jax.random.split(key, sites)))
    return h


def gibbs_sweep(generative, recognition, x, hidden, beta, key):
    """A sweep of single-site Gibbs updates over every hidden variable, bottom layer first, leaving
    π_β(h) ∝ q(h|x)^(1−β) p(x, h)^β invariant (annealed importance sampling's transition). A
    variable of layer l meets its own conditionals p(h_l | h_{l+1}) and q(h_l | h_{l−1}) and those
    of the layers that read it, p(h_{l−1} | h_l) (h_0 = x) and q(h_{l+1} | h_l)."""
    hidden, top = list(hidden), len(hidden) - 1
    chain, below = generative.chain.conditionals, [x, *hidden]  # chain[j] reads h_{L−j}: top down
    for layer, key in zip(range(top + 1), jax.random.split(key, top + 1)):
        units = recognition.units[layer]
        p_logits = (jnp.broadcast_to(generative.prior_logits[...], hidden[layer].shape) if layer == top
                    else chain[top - 1 - layer](hidden[layer + 1]))
        q_logits = recognition.conditionals[layer](below[layer])
        local = beta * units.value_log_probs(p_logits) + (1.0 - beta) * units.value_log_probs(q_logits)
        consumers = [(chain[top - layer], below[layer], generative.chain.units[top - layer], beta)]
        if layer < top:
            consumers.append((recognition.conditionals[layer + 1], hidden[layer + 1], recognition.units[layer + 1],
                              1.0 - beta))
        local = jnp.broadcast_to(local, hidden[layer].shape[:-1] + local.shape[-2:])
        hidden[layer] = _gibbs_layer(hidden[layer], units, local, consumers, key)
        below[layer + 1] = hidden[layer]
    return hidden


def make_networks(key, data_dim: int, layers, deterministic_hidden, activation, units=Bernoulli()):
    """(p(x, h), q(h | x)): the generative net and the recognition net of the mirror shape, each
    hidden layer `layers[l]` variables of `units`."""
    generative_key, recognition_key = jax.random.split(key)
    widths = [units.width(size) for size in layers]
    generative = Generative(data_dim, widths, deterministic_hidden, activation, units, rngs=nnx.Rngs(generative_key))
    recognition = StochasticChain([data_dim, *widths], [units] * len(widths), deterministic_hidden, activation,
                                  rngs=nnx.Rngs(recognition_key))
    return generative, recognition


class HelmholtzMachine:
    """What every family on these networks does alike, for a state with `generative` (p) and
    `recognition` (q): the measurements, always on the discrete model with exact draws, and the
    pictures. A family adds `init`, `train_step` and `evaluate`."""

    exact_likelihood = False
    selection_metric = "loss"  # the importance-sampled bound with K samples, on validation data

    def log_likelihood(self, state, x, key, num_samples: int):
        return objectives.log_mean_exp(self.log_weights(state, x, key, num_samples))

    def log_weights(self, state, x, key, num_samples: int, offsets=None):
        hidden, log_q = state.recognition.sample(x, key, num_samples, offsets=offsets)
        return state.generative.log_prob(x, hidden) - log_q  # [K, B]

    def local_offsets(self, state, x):
        """The local parameters of a refined q (`dgm_cli.refinement`): a shift of each layer's
        logits for each example of x [B, D], zero (q itself) at the start."""
        return [jnp.zeros((x.shape[0], conditional.layers[-1].kernel.shape[-1]))
                for conditional in state.recognition.conditionals]

    def refinement_objective(self, state, x, offsets, key, num_samples: int):
        """(surrogate [B], ELBO [B]) of q shifted by `offsets`: the surrogate's gradient in the offsets is
        an unbiased estimate of the ELBO's, by REINFORCE over K draws each baselined by the mean of the
        other K − 1 (Kool et al. 2019); the discrete draws have no path for a reparameterised one."""
        hidden, log_q = state.recognition.sample(x, key, num_samples, offsets=offsets)
        f = jax.lax.stop_gradient(state.generative.log_prob(x, hidden) - log_q)  # [K, B]
        baseline = (jnp.sum(f, 0) - f) / (num_samples - 1)
        # ∇ E[log p − log q] = E[(f − b) ∇ log q] − E[∇ log q], the last zero: dropped.
        return jnp.mean((f - baseline) * log_q, 0), jnp.mean(f, 0)

    def sample(self, state, key, n: int):
        _, hidden = state.generative.sample(key, n)
        return state.generative.pixel_probabilities(hidden[0])

    def reconstruct(self, state, x, key):
        hidden, _ = state.recognition.sample(x, key)
        return state.generative.pixel_probabilities(hidden[0])

    def extra_pictures(self, state):
        return {}

    def annealing_path(self, state, x):
        """AIS's path for x [B, D] (`dgm_cli.annealing`): from q(h|x) to p(x, h) by Gibbs sweeps."""
        def draw(key, chains):
            return state.recognition.sample(x, key, chains)[0]

        def log_densities(hidden):
            return state.generative.log_prob(x, hidden), state.recognition.log_prob(x, hidden)

        def sweep(hidden, beta, key):
            return gibbs_sweep(state.generative, state.recognition, x, hidden, beta, key)

        return annealing.Path(draw, log_densities, sweep)

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

from dgm_cli import nets, objectives
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

    def sample(self, h, key, num_samples: int | None = None, draw=None):
        """Draw every layer after `h` in turn, `num_samples` times over a new leading axis if given
        (h itself is not repeated: its logits are computed once); binary layers by `draw(key, p, shape)`
        if given. -> samples, total log-prob."""
        samples, log_prob = [], 0.0
        for index, (conditional, units) in enumerate(zip(self.conditionals, self.units)):
            logits = conditional(h)
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

    def log_weights(self, state, x, key, num_samples: int):
        hidden, log_q = state.recognition.sample(x, key, num_samples)
        return state.generative.log_prob(x, hidden) - log_q  # [K, B]

    def sample(self, state, key, n: int):
        _, hidden = state.generative.sample(key, n)
        return state.generative.pixel_probabilities(hidden[0])

    def reconstruct(self, state, x, key):
        hidden, _ = state.recognition.sample(x, key)
        return state.generative.pixel_probabilities(hidden[0])

    def extra_pictures(self, state):
        return {}

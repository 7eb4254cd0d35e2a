"""Helmholtz machine trained by wake-sleep (Hinton et al. 1995), or reweighted wake-sleep
(Bornschein & Bengio 2015).

Generative net p(x, h | θ) = p(h_L) Π_l p(h_{l−1} | h_l), with h_0 = x: a sigmoid belief net of
binary units, top prior Π_j Bern(σ(b_j)), each layer Bernoulli given the one above (its logits a
linear map of the layer above, or an MLP through `deterministic_hidden` layers). Recognition net
q(h | x, λ) = Π_l q(h_l | h_{l−1}): the mirror image, from the pixels up.

Wake:  h ~ q(h|x);          θ ascends log p(x, h | θ).
Sleep: (h̃, x̃) ~ p(x, h);   λ ascends log q(h̃ | x̃, λ).
With K > 1 samples h_k ~ q(h|x), the wake update of θ weighs each log p(x, h_k) by the normalised
importance weight w̃_k ∝ p(x, h_k) / q(h_k|x), and `q_update=wake|both` adds the wake-phase
update of λ, Σ_k w̃_k ∇ log q(h_k|x). K = 1 with `q_update=sleep` is the classic algorithm.

Binary units are drawn from random bits by `fires`, p rounded to the nearest multiple of their
resolution. Draws from q put log q(h|x) into importance weights (in training with K > 1, in
validation, in the test log-likelihood), so they take 24 bits, the most a float32 comparison holds
exactly; the sleep phase's dreams are only targets of log q(h̃|x̃), so they take 16. CPU time of an
epoch at batch 128 on 2 cores: 24-bit wake draws cost 1% with layers [200], K = 1 (1.30× the VAE's
epoch), nothing measurable with [200, 200], K = 5; 24-bit dreams would cost another 6%.
"""

import math
from itertools import pairwise
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dgm_cli import objectives
from dgm_cli.errors import DgmError, choice, positive_float, positive_int, positive_ints
from dgm_cli.models import nets
from dgm_cli.optim import apply_gradients

Q_UPDATES = {"sleep": (True, False), "wake": (False, True), "both": (True, True)}  # (sleep, wake)


def fires(bits, probabilities, resolution: int):
    """Bern(p) from `bits` uniform on {0, …, 2^n − 1}, n = `resolution`: fires with probability
    round(p·2^n)/2^n, as if u stood at the midpoint of its cell. The plain `u < p·2^n` rounds p up:
    a unit with p far below 2^-n fired at 2^-n while log q(h|x) charged it log p, and that one draw
    could outweigh the other K − 1 importance weights. Rounded to nearest, no p is overstated by
    more than a factor of 2 (just above 2^-(n+1)), and a p below 2^-(n+1) never fires: that leaves
    out only samples that q would draw less than once in 2^(n+1)."""
    return bits < jnp.round(probabilities * 2.0**resolution)  # exact in float32 for n ≤ 24


def bernoulli_16bit(key, probabilities, shape):
    """Bern(p) to 2^-16 from 16 random bits each, two to a 32-bit word: the sleep phase's dreams,
    most of a classic step's draws, on half the random bits of `bernoulli`."""
    size = math.prod(shape)
    words = jax.random.bits(key, ((size + 1) // 2,), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:size].reshape(shape)
    return fires(halves, probabilities, 16)


def bernoulli(key, probabilities, shape):
    """Bern(p) to 2^-24 from the top 24 bits of a 32-bit word: the same bits as jax.random.bernoulli,
    which compares p with (word >> 9) / 2^23 and so fires at 2^-23 however small a positive p is."""
    return fires(jax.random.bits(key, shape, jnp.uint32) >> 8, probabilities, 24)


class BernoulliChain(nnx.Module):
    """Layers of binary units, each Bernoulli given the one before: sizes[0] -> sizes[1] -> …"""

    def __init__(self, sizes, deterministic_hidden, activation, *, rngs: nnx.Rngs):
        self.conditionals = nnx.List(
            [nets.MLP([n_in, *deterministic_hidden, n_out], activation, rngs=rngs) for n_in, n_out in pairwise(sizes)]
        )

    def sample(self, h, key, num_samples: int | None = None, draw=bernoulli):
        """Draw every layer after `h` in turn, `num_samples` times over a new leading axis if given
        (h itself is not repeated: its logits are computed once). -> samples, total log-prob."""
        samples, log_prob = [], 0.0
        for index, conditional in enumerate(self.conditionals):
            logits = conditional(h)
            shape = (num_samples, *logits.shape) if num_samples and index == 0 else logits.shape
            h = draw(jax.random.fold_in(key, index), jax.nn.sigmoid(logits), shape).astype(logits.dtype)
            log_prob = log_prob + objectives.bernoulli_log_likelihood(h, logits)
            samples.append(h)
        return samples, log_prob

    def log_prob(self, h, samples):
        """Σ_l log p(samples[l] | the layer before), starting from `h`."""
        log_prob = 0.0
        for conditional, sample in zip(self.conditionals, samples):
            log_prob = log_prob + objectives.bernoulli_log_likelihood(sample, conditional(h))
            h = sample
        return log_prob


class Generative(nnx.Module):
    """p(x, h): a factorised Bernoulli prior on the top layer, then a chain down to the pixels."""

    def __init__(self, data_dim, layers, deterministic_hidden, activation, *, rngs: nnx.Rngs):
        self.prior_logits = nnx.Param(jnp.zeros(layers[-1]))
        self.chain = BernoulliChain([*reversed(layers), data_dim], deterministic_hidden, activation, rngs=rngs)

    def log_prob(self, x, hidden):
        """log p(x, h). hidden: [h_1, …, h_L] as q draws them (bottom up), each [..., size_l]."""
        top = hidden[-1]
        prior = objectives.bernoulli_log_likelihood(top, jnp.broadcast_to(self.prior_logits[...], top.shape))
        return prior + self.chain.log_prob(top, [*reversed(hidden[:-1]), x])

    def sample(self, key, n: int, draw=bernoulli):
        """Ancestral samples: -> x [n, D] and [h_1, …, h_L] (bottom up)."""
        top_key, chain_key = jax.random.split(key)
        top = draw(top_key, jax.nn.sigmoid(self.prior_logits[...]), (n, self.prior_logits.shape[0]))
        below, _ = self.chain.sample(top.astype(jnp.float32), chain_key, draw=draw)
        return below[-1], [*reversed(below[:-1]), top.astype(jnp.float32)]

    def pixel_probabilities(self, h_1):
        return jax.nn.sigmoid(self.chain.conditionals[-1](h_1))


class State(NamedTuple):
    generative: Generative
    recognition: BernoulliChain
    generative_opt: optax.OptState
    recognition_opt: optax.OptState


class WakeSleep:
    """The `dgm_cli.models.Model` contract for the Helmholtz machine."""

    exact_likelihood = False
    selection_metric = "loss"  # the importance-sampled bound with K samples, on validation data

    def __init__(self, config, spec, make_optimizer):
        self.data_dim = spec.dim
        self.layers = positive_ints(config.layers, "model.layers")
        if not self.layers:
            raise DgmError("model.layers must name at least one layer of hidden units, such as [200]")
        self.deterministic_hidden = positive_ints(config.deterministic_hidden, "model.deterministic_hidden")
        self.activation = nets.activation(config.activation)
        self.num_samples = positive_int(config.num_samples, "model.num_samples")
        self.sleep_update, self.wake_update = choice(config.q_update, Q_UPDATES, "model.q_update")
        if config.q_update == "wake" and self.num_samples == 1:
            raise DgmError("model.q_update=wake with model.num_samples=1 leaves q untrained: one sample has weight 1, "
                           "and its update ∇ log q(h|x) at h ~ q has mean zero; use model.q_update=sleep or both, "
                           "or model.num_samples > 1")
        sleep_lr = None if config.sleep_lr is None else positive_float(config.sleep_lr, "model.sleep_lr")
        self.generative_optimizer = make_optimizer()
        self.recognition_optimizer = make_optimizer(sleep_lr)

    def init(self, key) -> State:
        generative_key, recognition_key = jax.random.split(key)
        generative = Generative(self.data_dim, self.layers, self.deterministic_hidden, self.activation,
                                rngs=nnx.Rngs(generative_key))
        recognition = BernoulliChain([self.data_dim, *self.layers], self.deterministic_hidden, self.activation,
                                     rngs=nnx.Rngs(recognition_key))
        return State(generative, recognition, self.generative_optimizer.init(generative),
                     self.recognition_optimizer.init(recognition))

    def _sleep_loss(self, recognition, generative, key, n, draw=bernoulli):
        """−log q(h̃ | x̃) for n dreams (h̃, x̃) ~ p.  -> [n]."""
        x, hidden = generative.sample(key, n, draw)
        return -recognition.log_prob(x, hidden)

    def train_step(self, state: State, batch, key):
        x = batch["x"]
        wake_key, sleep_key = jax.random.split(key)
        hidden, log_q = state.recognition.sample(x, wake_key, self.num_samples)  # [K, B, …]

        def generative_loss(generative):
            log_p = generative.log_prob(x, hidden)  # [K, B]
            weights = jax.nn.softmax(jax.lax.stop_gradient(log_p - log_q), axis=0)
            return -jnp.mean(jnp.sum(weights * log_p, axis=0)), (log_p - log_q, weights)

        (_, (log_w, weights)), generative_grads = jax.value_and_grad(generative_loss, has_aux=True)(state.generative)

        def recognition_loss(recognition):
            sleep = jnp.mean(self._sleep_loss(recognition, state.generative, sleep_key, x.shape[0], bernoulli_16bit))
            wake = -jnp.mean(jnp.sum(weights * recognition.log_prob(x, hidden), axis=0)) if self.wake_update else 0.0
            return (sleep if self.sleep_update else 0.0) + wake, sleep

        (_, sleep_loss), recognition_grads = jax.value_and_grad(recognition_loss, has_aux=True)(state.recognition)
        generative, generative_opt = apply_gradients(
            self.generative_optimizer, generative_grads, state.generative, state.generative_opt)
        recognition, recognition_opt = apply_gradients(
            self.recognition_optimizer, recognition_grads, state.recognition, state.recognition_opt)
        metrics = {"loss": -jnp.mean(objectives.log_mean_exp(log_w)), "neg_elbo": -jnp.mean(log_w),
                   "sleep_loss": sleep_loss}
        return State(generative, recognition, generative_opt, recognition_opt), metrics

    def evaluate(self, state: State, batch, key):
        x = batch["x"]
        wake_key, sleep_key = jax.random.split(key)
        hidden, log_q = state.recognition.sample(x, wake_key, self.num_samples)  # [K, B, …]
        log_w = state.generative.log_prob(x, hidden) - log_q
        return {"loss": -objectives.log_mean_exp(log_w), "neg_elbo": -jnp.mean(log_w, axis=0),
                "sleep_loss": self._sleep_loss(state.recognition, state.generative, sleep_key, x.shape[0])}

    def log_likelihood(self, state: State, x, key, num_samples: int):
        hidden, log_q = state.recognition.sample(x, key, num_samples)
        return objectives.log_mean_exp(state.generative.log_prob(x, hidden) - log_q)

    def sample(self, state: State, key, n: int):
        _, hidden = state.generative.sample(key, n)
        return state.generative.pixel_probabilities(hidden[0])

    def reconstruct(self, state: State, x, key):
        hidden, _ = state.recognition.sample(x, key)
        return state.generative.pixel_probabilities(hidden[0])

    def extra_pictures(self, state: State):
        return {}

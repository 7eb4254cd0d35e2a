"""Helmholtz machine trained by wake-sleep (Hinton et al. 1995), or reweighted wake-sleep
(Bornschein & Bengio 2015).

Generative net p(x, h | θ), a sigmoid belief net, and recognition net q(h | x, λ), its mirror
image: the networks of `dgm_cli.models.helmholtz`.

Wake:  h ~ q(h|x);          θ ascends log p(x, h | θ).
Sleep: (h̃, x̃) ~ p(x, h);   λ ascends log q(h̃ | x̃, λ).
With K > 1 samples h_k ~ q(h|x), the wake update of θ weighs each log p(x, h_k) by the normalised
importance weight w̃_k ∝ p(x, h_k) / q(h_k|x), and `q_update=wake|both` adds the wake-phase
update of λ, Σ_k w̃_k ∇ log q(h_k|x). K = 1 with `q_update=sleep` is the classic algorithm.

The sleep phase's dreams are only targets of log q(h̃|x̃), so they take 16-bit draws
(`dgm_cli.bernoulli.bernoulli_16bit`), the wake phase's 24-bit ones: see `dgm_cli.bernoulli`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dgm_cli import objectives
from dgm_cli.errors import DgmError, choice, positive_float, positive_int
from dgm_cli.bernoulli import bernoulli, bernoulli_16bit
from dgm_cli.models.helmholtz import HelmholtzMachine, StochasticChain, Generative, make_networks, network_settings
from dgm_cli.optim import apply_gradients

Q_UPDATES = {"sleep": (True, False), "wake": (False, True), "both": (True, True)}  # (sleep, wake)


class State(NamedTuple):
    generative: Generative
    recognition: StochasticChain
    generative_opt: optax.OptState
    recognition_opt: optax.OptState


class WakeSleep(HelmholtzMachine):
    """The `dgm_cli.models.Model` contract for the Helmholtz machine."""

    def __init__(self, config, spec, make_optimizer):
        self.data_dim = spec.dim
        self.layers, self.deterministic_hidden, self.activation = network_settings(config)
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
        generative, recognition = make_networks(key, self.data_dim, self.layers, self.deterministic_hidden,
                                                self.activation)
        return State(generative, recognition, self.generative_optimizer.init(generative),
                     self.recognition_optimizer.init(recognition))

    def _sleep_loss(self, recognition, generative, key, n, draw=bernoulli):
        """−log q(h̃ | x̃) for n dreams (h̃, x̃) ~ p.  -> [n]."""
        x, hidden = generative.sample(key, n, draw)
        return -recognition.log_prob(x, hidden)

    def _gradients(self, state: State, x, key):
        """(θ's gradient, λ's gradient, metrics) of one step on the batch x."""
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
        metrics = {"loss": -jnp.mean(objectives.log_mean_exp(log_w)), "neg_elbo": -jnp.mean(log_w),
                   "sleep_loss": sleep_loss}
        return generative_grads, recognition_grads, metrics

    def train_step(self, state: State, batch, key):
        generative_grads, recognition_grads, metrics = self._gradients(state, batch["x"], key)
        generative, generative_opt = apply_gradients(
            self.generative_optimizer, generative_grads, state.generative, state.generative_opt)
        recognition, recognition_opt = apply_gradients(
            self.recognition_optimizer, recognition_grads, state.recognition, state.recognition_opt)
        return State(generative, recognition, generative_opt, recognition_opt), metrics

    def recognition_gradient(self, state: State, batch, key):
        """The λ-update of a step (sleep, wake or both, as configured), for the variance diagnostics."""
        return self._gradients(state, batch["x"], key)[1]

    def evaluate(self, state: State, batch, key):
        x = batch["x"]
        wake_key, sleep_key = jax.random.split(key)
        hidden, log_q = state.recognition.sample(x, wake_key, self.num_samples)  # [K, B, …]
        log_w = state.generative.log_prob(x, hidden) - log_q
        return {"loss": -objectives.log_mean_exp(log_w), "neg_elbo": -jnp.mean(log_w, axis=0),
                "sleep_loss": self._sleep_loss(state.recognition, state.generative, sleep_key, x.shape[0])}

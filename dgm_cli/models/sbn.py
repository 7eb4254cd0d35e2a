"""Sigmoid belief net trained on one objective, its recognition gradient from a chosen estimator.

The Helmholtz machine's networks (`dgm_cli.models.helmholtz`, shared with `wakesleep`): a
generative sigmoid belief net p(x, h | θ) and a recognition net q(h | x, λ) of the mirror shape.
Both ascend one objective, L̂ = log (1/K) Σ_k p(x, h_k) / q(h_k|x) with h_k ~ q(h|x): the ELBO for
K = 1 (`num_samples`), the importance-weighted bound for K > 1. θ gets the ordinary gradient
Σ_k w̃_k ∇_θ log p(x, h_k); h is discrete, so ∇_λ has no reparameterisation and comes from
`model.estimator` (`dgm_cli.estimators`: reinforce, nvil, vimco, rloo, arm, disarm, rebar, relax,
concrete, straight_through, gumbel_st, reinmax; `rloo` trains the ELBO averaged over its K draws).
The hidden units are binary, or categorical (`model.units=categorical`, `model.categories=C`: each
of a layer's `layers[l]` variables one of C values, one-hot) for the estimators that apply to them.
Validation, test and pictures always use the discrete model, whatever the estimator.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dgm_cli import estimators, objectives
from dgm_cli.errors import DgmError, choice, positive_float, positive_int, positive_ints, probability
from dgm_cli.models.helmholtz import HelmholtzMachine, StochasticChain, Generative, make_networks, network_settings
from dgm_cli.optim import apply_gradients
from dgm_cli.units import Bernoulli, Categorical


class State(NamedTuple):
    generative: Generative
    recognition: StochasticChain
    baselines: nnx.Module | None  # the estimator's own nets ψ: nvil's baselines, rebar's and relax's control variates
    stats: dict  # the estimator's running statistics (`estimators.init_stats`)
    generative_opt: optax.OptState
    recognition_opt: optax.OptState
    baselines_opt: optax.OptState


class SBN(HelmholtzMachine):
    """The `dgm_cli.models.Model` contract for a sigmoid belief net with a gradient estimator."""

    def __init__(self, config, spec, make_optimizer):
        self.data_dim = spec.dim
        self.layers, self.deterministic_hidden, self.activation = network_settings(config)
        self.num_samples = positive_int(config.num_samples, "model.num_samples")
        self.estimator = choice(config.estimator, estimators.ESTIMATORS, "model.estimator")
        name = f"model.estimator={config.estimator}"
        if self.num_samples < self.estimator.min_samples:
            raise DgmError(f"{name} needs model.num_samples >= {self.estimator.min_samples}: each sample's "
                           f"baseline is built from the others; got {self.num_samples}")
        if self.estimator.max_samples is not None and self.num_samples > self.estimator.max_samples:
            any_k = ", ".join(sorted(n for n, e in estimators.ESTIMATORS.items()
                                     if e.max_samples is None and not e.averaged_elbo))
            raise DgmError(f"{name} trains the ELBO with model.num_samples=1 (got {self.num_samples}); "
                           f"for the K-sample bound choose model.estimator from: {any_k}")
        self.units = choice(config.units, {"bernoulli": Bernoulli(), "categorical": None}, "model.units")
        if self.units is None:
            categories = positive_int(config.categories, "model.categories")
            if categories < 2:
                raise DgmError(f"model.categories must be at least 2, got {categories}")
            if not self.estimator.categorical:
                works = ", ".join(sorted(n for n, e in estimators.ESTIMATORS.items() if e.categorical))
                raise DgmError(f"{name} works on binary units only; for model.units=categorical choose "
                               f"model.estimator from: {works}")
            self.units = Categorical(categories)
        self.settings = estimators.Settings(
            num_samples=self.num_samples,
            baseline_decay=probability(config.baseline_decay, "model.baseline_decay"),
            temperature=positive_float(config.temperature, "model.temperature"),
            prior_temperature=positive_float(config.prior_temperature, "model.prior_temperature"))
        self.baseline_hidden = positive_ints(config.baseline_hidden, "model.baseline_hidden")
        self.generative_optimizer = make_optimizer()
        self.recognition_optimizer = make_optimizer()
        self.baselines_optimizer = make_optimizer()

    def init(self, key) -> State:
        networks_key, baseline_key = jax.random.split(key)
        generative, recognition = make_networks(networks_key, self.data_dim, self.layers, self.deterministic_hidden,
                                                self.activation, self.units)
        baselines = None  # ψ: nvil's baseline nets, rebar's and relax's control variates
        if self.estimator.controls is not None:
            widths = [self.data_dim, *(self.units.width(size) for size in self.layers)]
            baselines = self.estimator.controls(recognition, widths, self.baseline_hidden, self.activation,
                                                self.settings, nnx.Rngs(baseline_key))
        return State(generative, recognition, baselines, estimators.init_stats(len(self.layers)),
                     self.generative_optimizer.init(generative), self.recognition_optimizer.init(recognition),
                     self.baselines_optimizer.init(baselines))

    def _gradients(self, state: State, x, key):
        """The estimate of −∇ of the objective for every net, the running statistics after this
        batch, and its metrics."""
        def loss(networks):  # the surrogate: its gradient is the estimate (`dgm_cli.estimators`)
            return self.estimator.estimate(networks, state.stats, x, key, self.settings)

        (_, (stats, metrics)), grads = jax.value_and_grad(loss, has_aux=True)(
            estimators.Nets(state.generative, state.recognition, state.baselines))
        return grads, stats, metrics

    def train_step(self, state: State, batch, key):
        grads, stats, metrics = self._gradients(state, batch["x"], key)
        generative, generative_opt = apply_gradients(
            self.generative_optimizer, grads.generative, state.generative, state.generative_opt)
        recognition, recognition_opt = apply_gradients(
            self.recognition_optimizer, grads.recognition, state.recognition, state.recognition_opt)
        baselines, baselines_opt = state.baselines, state.baselines_opt  # None but for nvil, rebar, relax
        if baselines is not None:
            baselines, baselines_opt = apply_gradients(self.baselines_optimizer, grads.baselines, baselines, baselines_opt)
        return State(generative, recognition, baselines, stats, generative_opt, recognition_opt, baselines_opt), metrics

    def recognition_gradient(self, state: State, batch, key):
        return self._gradients(state, batch["x"], key)[0].recognition

    def evaluate(self, state: State, batch, key):
        x = batch["x"]
        hidden, log_q = state.recognition.sample(x, key, self.num_samples)  # [K, B, …], 24-bit draws
        log_w = state.generative.log_prob(x, hidden) - log_q
        neg_elbo = -jnp.mean(log_w, axis=0)
        loss = neg_elbo if self.estimator.averaged_elbo else -objectives.log_mean_exp(log_w)  # what it trains on
        return {"loss": loss, "neg_elbo": neg_elbo}

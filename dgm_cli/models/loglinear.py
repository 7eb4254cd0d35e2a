"""Log-linear latent class models trained with EM.

p(x, z | w) = p(z) p(x | z, w) with z ∈ {1, …, K} and p(x | z, w) = exp(w_zᵀ φ(x)) / Z_z(w),
Z_z(w) = Σ_{x' ∈ X} exp(w_zᵀ φ(x')): features f(x, z) = φ(x) ⊗ onehot(z), so that
∇_{w_z} log p(x | z, w) = φ(x) − E[φ(X) | z, w].

Features:
  pixel     φ(x) = x. Z_z factorises over pixels: a mixture of multivariate Bernoullis in natural
            parameters, p(x | z) = Π_d Bern(x_d | σ(w_zd)).
  pairwise  φ(x) adds x_i x_j for every pair of 4-neighbouring pixels. Z_z then needs the sum over
            all 2^D images, allowed only while 2^D ≤ `max_states`.
The prior p(z) = softmax(b)_z (the per-class bias) is learned, or uniform.

EM, one iteration per training step:
  E-step  responsibilities r_nz = p(z | x_n, w), exact, and the expected statistics
          t_z = mean_n r_nz φ(x_n), r_z = mean_n r_nz.
  M-step  maximise Σ_z [w_z·t_z − r_z log Z_z(w)], the expected complete-data log-likelihood
          per example, whose gradient matches t_z against r_z E[φ | z, w]:
          exact     (pixel features) σ(w_zd) = (N t_zd + α) / (N r_z + 2α);
          gradient  (any features) `m_step_iters` steps of the M-step's own optimizer
                    (`m_step_optimizer`) from the current w, its state fresh in every M-step.
Smoothing α adds 2α virtual examples to every class, spread uniformly over X (E_uniform φ is ½ for
a pixel, ¼ for a pair): a Beta(α, α) prior on each pixel probability, and Dirichlet(α) on p(z).
On the whole training set as one batch this is EM; on minibatches it is stepwise EM (Liang & Klein
2009): the statistics are running averages with step size (t + 1)^−κ. With `observed_z`, the
data's labels give r_nz = [z = label_n] and no E-step is needed.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dgm_cli.errors import DgmError, choice, positive_float, positive_int
from dgm_cli.optim import apply_gradients, constant_optimizer


def neighbour_pairs(height: int, width: int):
    """Indices (i, j) of the 4-neighbouring pixel pairs of an H × W image, row-major."""
    index = jnp.arange(height * width).reshape(height, width)
    first = jnp.concatenate([index[:, :-1].ravel(), index[:-1, :].ravel()])
    second = jnp.concatenate([index[:, 1:].ravel(), index[1:, :].ravel()])
    return first, second


class PixelFeatures:
    """φ(x) = x, whose normaliser factorises over the pixels."""

    def __init__(self, spec, max_states: int):
        self.dim = self.size = spec.dim  # F = D

    def __call__(self, x):
        return x

    def log_normalizer(self, w):
        """log Z_z = Σ_d log(1 + exp(w_zd)).  w: [K, F] -> [K]."""
        return jnp.sum(jax.nn.softplus(w), axis=-1)

    def uniform_mean(self):
        return jnp.full(self.size, 0.5)

    def sample(self, w, key):
        """x ~ p(x | z) for rows w_z of w: [n, F] -> [n, D]."""
        return jax.random.bernoulli(key, jax.nn.sigmoid(w)).astype(jnp.float32)


class PairwiseFeatures:
    """φ(x) = (x, x_i x_j for the 4-neighbour pairs), whose normaliser sums over all of X."""

    def __init__(self, spec, max_states: int):
        if 2**spec.dim > max_states:
            raise DgmError(
                f"pairwise features need Z_z, a sum over all 2^{spec.dim} images x' in X, which "
                f"cannot be enumerated (model.max_states={max_states}); use model.features=pixel, "
                f"whose normaliser factorises, or a smaller image"
            )
        self.dim = spec.dim
        self.pairs = neighbour_pairs(*spec.image_shape)
        self.size = self.dim + len(self.pairs[0])  # F = D + P

    def __call__(self, x):
        """[..., D] -> [..., D + P]."""
        return jnp.concatenate([x, x[..., self.pairs[0]] * x[..., self.pairs[1]]], axis=-1)

    def all_images(self):
        """Every x ∈ X = {0, 1}^D: [2^D, D]."""
        bits = jnp.arange(2**self.dim)[:, None] >> jnp.arange(self.dim)
        return (bits & 1).astype(jnp.float32)

    def log_normalizer(self, w):
        """log Z_z = log Σ_{x ∈ X} exp(w_zᵀ φ(x)), by enumeration.  w: [K, F] -> [K]."""
        return jax.nn.logsumexp(self(self.all_images()) @ w.T, axis=0)

    def uniform_mean(self):
        return jnp.concatenate([jnp.full(self.dim, 0.5), jnp.full(self.size - self.dim, 0.25)])

    def sample(self, w, key):
        """x ~ p(x | z) for rows w_z of w, exactly, by enumeration: [n, F] -> [n, D]."""
        images = self.all_images()
        return images[jax.random.categorical(key, w @ self(images).T, axis=-1)]


FEATURES = {"pixel": PixelFeatures, "pairwise": PairwiseFeatures}


class State(NamedTuple):
    weights: jax.Array  # [K, F]: w_z
    prior_logits: jax.Array  # [K]: log p(z) up to a constant
    statistics: jax.Array  # [K, F]: running mean_n r_nz φ(x_n)
    counts: jax.Array  # [K]: running mean_n r_nz
    step: jax.Array  # EM iterations so far


class LogLinear:
    """The `dgm_cli.models.Model` contract for the log-linear latent class model."""

    exact_likelihood = True
    selection_metric = "loss"  # the exact negative log-likelihood

    def __init__(self, config, spec, make_optimizer):
        self.num_components = positive_int(config.num_components, "model.num_components")
        self.observed_z = bool(config.observed_z)
        if self.observed_z and spec.num_classes is None:
            raise DgmError("model.observed_z=true needs a data set with labels, such as dataset=digits")
        if self.observed_z and self.num_components != spec.num_classes:
            raise DgmError(f"model.observed_z=true takes one component per class: set model.num_components={spec.num_classes}")
        max_states = positive_int(config.max_states, "model.max_states")
        self.features = choice(config.features, FEATURES, "model.features")(spec, max_states)
        self.learn_prior = choice(config.prior, {"learned": True, "uniform": False}, "model.prior")
        self.m_step = choice(config.m_step, {"exact": self._exact_m_step, "gradient": self._gradient_m_step}, "model.m_step")
        if config.m_step == "exact" and config.features != "pixel":
            raise DgmError("model.m_step=exact has a closed form for pixel features only; use model.m_step=gradient")
        self.m_step_iters = positive_int(config.m_step_iters, "model.m_step_iters")
        self.smoothing = positive_float(config.smoothing, "model.smoothing")  # 0 would allow log 0
        self.stepwise_decay = config.stepwise_decay
        if isinstance(self.stepwise_decay, bool) or not isinstance(self.stepwise_decay, (int, float)) or not 0.5 < self.stepwise_decay <= 1:
            # Stepwise EM converges for step sizes whose sum diverges and whose squares' sum does not.
            raise DgmError(f"model.stepwise_decay must lie in (0.5, 1], got {config.stepwise_decay!r}")
        self.num_train = spec.num_train
        # Not `make_optimizer`: its schedule counts the run's steps (one per EM iteration), not the
        # M-step's inner ones, and its learning rate is tuned for networks (optimizer.lr=1e-3 moved
        # the weights so little per M-step that 30 EM iterations on bars ended 3.3 nats short).
        self.m_step_optimizer = constant_optimizer(config.m_step_optimizer, "model.m_step_optimizer")

    def init(self, key) -> State:
        # Pixel probabilities drawn from [0.25, 0.75], as is usual for Bernoulli mixtures; no pair
        # interactions yet.
        means = jax.random.uniform(key, (self.num_components, self.features.dim), minval=0.25, maxval=0.75)
        weights = jnp.zeros((self.num_components, self.features.size))
        weights = weights.at[:, : self.features.dim].set(jnp.log(means) - jnp.log1p(-means))
        zeros = jnp.zeros(self.num_components)
        return State(weights, zeros, jnp.zeros_like(weights), zeros, jnp.zeros((), jnp.int32))

    def _log_joint(self, state: State, x):
        """log p(x, z) for every z: [B, D] -> [B, K]."""
        log_prior = jax.nn.log_softmax(state.prior_logits)
        return log_prior + self.features(x) @ state.weights.T - self.features.log_normalizer(state.weights)

    def _exact_m_step(self, weights, statistics, counts):
        n, alpha = self.num_train, self.smoothing
        return jnp.log(n * statistics + alpha) - jnp.log(n * (counts[:, None] - statistics) + alpha)

    def _gradient_m_step(self, weights, statistics, counts):
        virtual = 2 * self.smoothing / self.num_train  # the smoothing's examples, per real example
        targets = statistics + virtual * self.features.uniform_mean()  # [K, F]

        def loss(weights):  # minus the expected complete-data log-likelihood, per example
            return jnp.sum((counts + virtual) * self.features.log_normalizer(weights)) - jnp.sum(weights * targets)

        def step(carry, _):
            weights, opt_state = carry
            return apply_gradients(self.m_step_optimizer, jax.grad(loss)(weights), weights, opt_state), None

        # Each M-step maximises a new objective (new statistics): the moments of the last one's
        # gradients would be stale, so the optimizer starts afresh, and its state needs no saving.
        initial = (weights, self.m_step_optimizer.init(weights))
        (weights, _), _ = jax.lax.scan(step, initial, length=self.m_step_iters)
        return weights

    def train_step(self, state: State, batch, key):
        x = batch["x"]
        log_joint = self._log_joint(state, x)  # [B, K]
        log_p = jax.nn.logsumexp(log_joint, axis=-1)  # [B], before this iteration's M-step
        if self.observed_z:
            responsibilities = jax.nn.one_hot(batch["labels"], self.num_components)
        else:  # E-step
            responsibilities = jnp.exp(log_joint - log_p[:, None])  # p(z | x)
        batch_statistics = responsibilities.T @ self.features(x) / x.shape[0]  # [K, F]
        batch_counts = jnp.mean(responsibilities, axis=0)  # [K]
        # On the whole training set the statistics are the batch's; on minibatches, running averages.
        rate = 1.0 if x.shape[0] == self.num_train else (state.step + 1.0) ** -self.stepwise_decay
        statistics = (1 - rate) * state.statistics + rate * batch_statistics
        counts = (1 - rate) * state.counts + rate * batch_counts
        weights = self.m_step(state.weights, statistics, counts)
        prior_logits = jnp.log(self.num_train * counts + self.smoothing) if self.learn_prior else state.prior_logits
        return State(weights, prior_logits, statistics, counts, state.step + 1), {"loss": -jnp.mean(log_p)}

    def evaluate(self, state: State, batch, key):
        nll = -jax.nn.logsumexp(self._log_joint(state, batch["x"]), axis=-1)
        # The ELBO with the exact posterior q(z | x) = p(z | x) is log p(x) itself.
        return {"loss": nll, "neg_elbo": nll}

    def log_likelihood(self, state: State, x, key, num_samples: int):
        return jax.nn.logsumexp(self._log_joint(state, x), axis=-1)

    def component_means(self, state: State):
        """E[x | z] for every z, [K, D]: the gradient of log Z_z with respect to the pixel weights."""
        means = jax.grad(lambda w: jnp.sum(self.features.log_normalizer(w)))(state.weights)
        return means[:, : self.features.dim]

    def sample(self, state: State, key, n: int):
        component_key, image_key = jax.random.split(key)
        z = jax.random.categorical(component_key, state.prior_logits, shape=(n,))
        return self.features.sample(state.weights[z], image_key)

    def reconstruct(self, state: State, x, key):
        """The mean image of each example's most probable component."""
        return self.component_means(state)[jnp.argmax(self._log_joint(state, x), axis=-1)]

    def extra_pictures(self, state: State):
        """The components' mean images, the most probable first."""
        return {"components": self.component_means(state)[jnp.argsort(-state.prior_logits)]}

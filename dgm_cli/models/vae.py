"""Variational autoencoder (Kingma & Welling 2014) with the IWAE bound (Burda et al. 2016).

Prior p(z) = N(0, I); decoder p(x|z) = Π_d Bern(x_d | σ(NN_θ(z)_d)); encoder
q(z|x) = N(μ_λ(x), diag σ_λ(x)²). Both networks ascend one objective, the ELBO
E_q[log p(x|z)] − KL(q(z|x) ‖ p(z)), through the reparameterisation z = μ + σ ⊙ ε, ε ~ N(0, I),
with the KL in closed form; with k > 1 samples, the IWAE bound log (1/k) Σ_i p(x, z_i) / q(z_i|x).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dgm_cli import objectives
from dgm_cli.errors import positive_int, positive_ints
from dgm_cli.optim import apply_gradients
from dgm_cli.models import nets


class Networks(nnx.Module):
    def __init__(self, data_dim, hidden, latent_dim, activation, *, rngs: nnx.Rngs):
        # The encoder outputs μ and log σ² side by side; the decoder mirrors the encoder.
        self.encoder = nets.MLP([data_dim, *hidden, 2 * latent_dim], activation, rngs=rngs)
        self.decoder = nets.MLP([latent_dim, *reversed(hidden), data_dim], activation, rngs=rngs)

    def encode(self, x):
        """x: [..., D] -> μ, log σ²: [..., L]."""
        mean, log_var = jnp.split(self.encoder(x), 2, axis=-1)
        return mean, log_var

    def decode(self, z):
        """z: [..., L] -> Bernoulli logits [..., D]."""
        return self.decoder(z)


class State(NamedTuple):
    nets: Networks
    opt_state: optax.OptState


class VAE:
    """The `dgm_cli.models.Model` contract for the VAE."""

    exact_likelihood = False
    selection_metric = "loss"  # the training bound, on validation data: the ELBO, or IWAE's for k > 1

    def __init__(self, config, spec, make_optimizer):
        self.data_dim = spec.dim
        self.hidden = positive_ints(config.hidden, "model.hidden")
        self.latent_dim = positive_int(config.latent_dim, "model.latent_dim")
        self.activation = nets.activation(config.activation)
        self.num_samples = positive_int(config.num_samples, "model.num_samples")
        self.optimizer = make_optimizer()

    def init(self, key) -> State:
        networks = Networks(
            self.data_dim, self.hidden, self.latent_dim, self.activation, rngs=nnx.Rngs(key)
        )
        return State(networks, self.optimizer.init(networks))

    def _log_weights(self, networks, x, key, k):
        """log p(x, z_i) − log q(z_i|x) and log p(x|z_i) for z_i ~ q(z|x), plus the analytic KL.
        x: [B, D] -> [k, B], [k, B], [B]."""
        mean, log_var = networks.encode(x)  # [B, L]
        eps = jax.random.normal(key, (k, *mean.shape))
        z = mean + jnp.exp(0.5 * log_var) * eps  # [k, B, L]
        log_px_z = objectives.bernoulli_log_likelihood(x, networks.decode(z))  # [k, B]
        log_weights = (
            log_px_z
            + objectives.standard_normal_log_density(z)
            - objectives.gaussian_log_density(z, mean, log_var)
        )
        return log_weights, log_px_z, objectives.gaussian_kl(mean, log_var)

    def _bounds(self, networks, x, key, k):
        """Per-example training bound (ELBO for k = 1, IWAE for k > 1), −E log p(x|z) and KL."""
        log_weights, log_px_z, kl = self._log_weights(networks, x, key, k)
        recon = -jnp.mean(log_px_z, axis=0)
        # With one sample the analytic KL gives a lower-variance ELBO than the density ratio.
        bound = -(recon + kl) if k == 1 else objectives.log_mean_exp(log_weights)
        return bound, recon, kl

    def _metrics(self, networks, x, key):
        """Per-example loss (the negated training bound), neg-ELBO, −E log p(x|z) and KL."""
        bound, recon, kl = self._bounds(networks, x, key, self.num_samples)
        return {"loss": -bound, "neg_elbo": recon + kl, "recon": recon, "kl": kl}

    def train_step(self, state: State, batch, key):
        def loss_fn(networks):
            metrics = jax.tree.map(jnp.mean, self._metrics(networks, batch["x"], key))
            return metrics["loss"], metrics

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.nets)
        return State(*apply_gradients(self.optimizer, grads, state.nets, state.opt_state)), metrics

    def evaluate(self, state: State, batch, key):
        return self._metrics(state.nets, batch["x"], key)

    def log_likelihood(self, state: State, x, key, num_samples: int):
        log_weights, _, _ = self._log_weights(state.nets, x, key, num_samples)
        return objectives.log_mean_exp(log_weights)

    def sample(self, state: State, key, n: int):
        z = jax.random.normal(key, (n, self.latent_dim))
        return jax.nn.sigmoid(state.nets.decode(z))

    def reconstruct(self, state: State, x, key):
        mean, _ = state.nets.encode(x)
        return jax.nn.sigmoid(state.nets.decode(mean))

    def extra_pictures(self, state: State):
        return {}

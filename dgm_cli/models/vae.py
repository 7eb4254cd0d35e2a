"""Variational autoencoder (Kingma & Welling 2014) with the IWAE bound (Burda et al. 2016), with
one stochastic layer or several, and a standard or a learned prior.

Generative model p(z_L) Π_l p(z_{l−1} | z_l) · p(x | z_1): each p(z_{l−1} | z_l) a diagonal Gaussian
and p(x | z_1) = Π_d Bern(x_d | σ(NN_θ(z_1)_d)), from MLPs. Prior p(z_L) = N(0, I), or the
VampPrior (Tomczak & Welling 2018) (1/K) Σ_k q(z_L | u_k) at K learned pseudo-inputs u_k.
Inference model q(z_1 | x) Π_l q(z_l | z_{l−1}), diagonal Gaussians from MLPs, the mirror image
(Burda et al.'s two-layer model); z_l = μ + σ ⊙ ε through every layer.

One layer: `hidden=[400] latent_dim=20`. Several: `hidden=[[200,200],[100,100]] latent_dim=[100,50]`,
bottom first: layer l's hidden sizes inside q(z_l | z_{l−1}) and, reversed, inside p(z_{l−1} | z_l).

Both networks ascend one objective, the ELBO E_q[log p(x|z_1)] − Σ_l KL_l, with
KL_l = E_q[log q(z_l | z_{l−1}) − log p(z_l | z_{l+1})] in closed form for the top layer under
N(0, I) (given z_{L−1}) and its one-sample estimate otherwise; with k > 1 samples the IWAE bound
log (1/k) Σ_i p(x, z_i) / q(z_i | x). KL warm-up weighs the KL terms by β = min(1, step / warm-up
steps) (Sønderby et al. 2016); free bits replace each layer's batch-mean KL by max(λ, KL_l) (Kingma
et al. 2016, one group per layer). Both shape only the training objective: every reported metric
is the plain bound.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dgm_cli import annealing, nets, objectives
from dgm_cli.errors import DgmError, choice, per_job, positive_int, positive_ints
from dgm_cli.optim import apply_gradients

ACTIVE_UNIT_THRESHOLD = 1e-2  # Burda et al.: a unit is active when Cov_x(E_q[z_u]) exceeds it
ACTIVE_UNIT_SAMPLES = 10  # draws of the layers below that average E_q[z_l | x] for l > 1 (≥ 2: their spread is used)


def _variance_of_posterior_means(means):
    """Var_x(E[μ | x]) over N examples from M i.i.d. draws of μ [M, N, L] at each: [L], unbiased.

    The mean of the draws m̄(x) = E[μ | x] + noise of variance Var(μ | x) / M, so Var_x(m̄)
    overstates the statistic by E[Var_x(noise)] = (1 − 1/N) E_x[Var(μ | x)] / M; the within-x
    sample variance s²(x) (M − 1 in the denominator) estimates Var(μ | x) without bias:
        Var_x(m̄) − (1 − 1/N) E_x[s²(x)] / M.
    It is one-way ANOVA's between-group variance component, with Var_x over N, not N − 1."""
    m, n = means.shape[0], means.shape[1]
    noise = jnp.mean(jnp.var(means, axis=0, ddof=1), axis=0) / m  # E_x[s²(x)] / M, [L]
    return jnp.var(jnp.mean(means, axis=0), axis=0) - (1.0 - 1.0 / n) * noise


def _split(output):
    """An MLP's output [..., 2L] -> (μ, log σ²), each [..., L]."""
    mean, log_var = jnp.split(output, 2, axis=-1)
    return mean, log_var


class Networks(nnx.Module):
    def __init__(self, data_dim, hidden, latent_dims, activation, num_pseudo_inputs, *, rngs: nnx.Rngs):
        # The bottom layer's nets keep the one-layer VAE's names and shapes, so that its runs read
        # the same. The encoders output μ and log σ² side by side; each decoder mirrors its encoder.
        self.encoder = nets.MLP([data_dim, *hidden[0], 2 * latent_dims[0]], activation, rngs=rngs)
        self.decoder = nets.MLP([latent_dims[0], *reversed(hidden[0]), data_dim], activation, rngs=rngs)
        self.upper_encoders = nnx.List([  # q(z_l | z_{l−1}), l = 2 … L
            nets.MLP([below, *sizes, 2 * size], activation, rngs=rngs)
            for below, size, sizes in zip(latent_dims, latent_dims[1:], hidden[1:])])
        self.upper_decoders = nnx.List([  # p(z_{l−1} | z_l), l = 2 … L
            nets.MLP([size, *reversed(sizes), 2 * below], activation, rngs=rngs)
            for below, size, sizes in zip(latent_dims, latent_dims[1:], hidden[1:])])
        if num_pseudo_inputs:  # Tomczak & Welling's initialisation, N(0.05, 0.01²), clipped to [0, 1] in use
            self.pseudo_inputs = nnx.Param(0.05 + 0.01 * jax.random.normal(rngs.params(), (num_pseudo_inputs, data_dim)))

    def encoders(self):
        return [self.encoder, *self.upper_encoders]

    def encode(self, x):
        """x: [..., D] -> μ, log σ² of q(z_1 | x): [..., L_1]."""
        return _split(self.encoder(x))

    def decode(self, z):
        """z_1: [..., L_1] -> Bernoulli logits of p(x | z_1) [..., D]."""
        return self.decoder(z)


class State(NamedTuple):
    nets: Networks
    opt_state: optax.OptState
    steps: jax.Array | None = None  # training steps taken, kept only for the KL warm-up


class Draw(NamedTuple):
    """One pass through the inference model and the generative model, for k samples each."""

    latents: list  # z_l, [k, B, L_l] each, bottom first
    log_px_z: jax.Array  # log p(x | z_1), [k, B]
    log_p: list  # log p(z_l | z_{l+1}), the prior's for the top layer, [k, B] each
    log_q: list  # log q(z_l | z_{l−1}), [k, B] each
    kls: list  # KL_l per example, [B] each: in closed form where there is one


def _latent_setting(config):
    """(hidden per layer, latent sizes): `hidden=[400] latent_dim=20` or, for several layers,
    `hidden=[[…], […]] latent_dim=[…, …]`."""
    latent_dim = config.latent_dim
    if isinstance(latent_dim, int) and not isinstance(latent_dim, bool):
        return [positive_ints(config.hidden, "model.hidden")], [positive_int(latent_dim, "model.latent_dim")]
    latent_dims = positive_ints(latent_dim, "model.latent_dim")
    if not latent_dims:
        raise DgmError("model.latent_dim must be a latent size, such as 20, or a list of them, such as [100, 50]")
    hidden = config.hidden
    is_list = lambda value: value is not None and not isinstance(value, (str, int, float))
    if not (is_list(hidden) and all(is_list(sizes) for sizes in hidden) and len(hidden) == len(latent_dims)):
        example = [[200, 200], [100, 100], [50, 50], [25, 25]][:len(latent_dims)]
        raise DgmError(f"with model.latent_dim={list(latent_dims)}, model.hidden must list the hidden sizes of each "
                       f"of its {len(latent_dims)} stochastic layers, such as {example}; got {hidden}")
    return [positive_ints(h, "model.hidden") for h in hidden], latent_dims


class VAE:
    """The `dgm_cli.models.Model` contract for the VAE."""

    exact_likelihood = False
    selection_metric = "loss"  # the training bound, on validation data: the ELBO, or IWAE's for k > 1

    def __init__(self, config, spec, make_optimizer):
        self.data_dim = spec.dim
        self.hidden, self.latent_dims = _latent_setting(config)
        self.activation = nets.activation(config.activation)
        self.num_samples = positive_int(config.num_samples, "model.num_samples")
        self.vamp = choice(config.prior, {"standard": False, "vamp": True}, "model.prior")
        self.num_pseudo_inputs = positive_int(config.num_pseudo_inputs, "model.num_pseudo_inputs") if self.vamp else 0
        warmup = config.kl_warmup_epochs
        if not per_job(warmup) and (isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or warmup < 0):
            raise DgmError(f"model.kl_warmup_epochs must be a non-negative number of epochs, got {warmup!r}")
        # A packed group's per-job warm-ups are all positive: zero, which removes the warm-up's
        # step count from the state, packs only with zero (`dgm_cli.packing`).
        self.warms_up = per_job(warmup) or warmup > 0
        self.warmup_steps = warmup * make_optimizer.steps_per_epoch if self.warms_up else 0
        free_bits = config.free_bits
        if isinstance(free_bits, bool) or not isinstance(free_bits, (int, float)) or free_bits < 0:
            raise DgmError(f"model.free_bits must be a non-negative number of nats per layer, got {free_bits!r}")
        if free_bits and self.num_samples > 1:
            raise DgmError("model.free_bits floors each layer's KL in the ELBO; with model.num_samples > 1 the "
                           "IWAE bound has no KL terms to floor: use one of the two")
        self.free_bits = float(free_bits)
        self.optimizer = make_optimizer()

    def init(self, key) -> State:
        networks = Networks(self.data_dim, self.hidden, self.latent_dims, self.activation, self.num_pseudo_inputs,
                            rngs=nnx.Rngs(key))
        return State(networks, self.optimizer.init(networks),
                     jnp.zeros((), jnp.int32) if self.warms_up else None)

    # The prior and the pieces of the two models.

    def _vamp_components(self, networks):
        """(μ, log σ²) [K, L_top] of q(z_L | u_k) at each pseudo-input; above the bottom layer, u_k
        passes through the lower layers by their means, so that each component stays a Gaussian."""
        h = jnp.clip(networks.pseudo_inputs[...], 0.0, 1.0)
        for encoder in networks.encoders()[:-1]:
            h, _ = _split(encoder(h))
        return _split(networks.encoders()[-1](h))

    def _log_prior(self, networks, z):
        """log p(z_L): N(0, I), or the VampPrior's mixture density, exactly.  [...]"""
        if not self.vamp:
            return objectives.standard_normal_log_density(z)
        mean, log_var = self._vamp_components(networks)  # [K, L]
        return objectives.log_mean_exp(objectives.gaussian_log_densities(z, mean, log_var), axis=-1)

    def _sample_prior(self, networks, key, n):
        if not self.vamp:
            return jax.random.normal(key, (n, self.latent_dims[-1]))
        component_key, noise_key = jax.random.split(key)
        mean, log_var = self._vamp_components(networks)
        k = jax.random.randint(component_key, (n,), 0, mean.shape[0])
        return mean[k] + jnp.exp(0.5 * log_var[k]) * jax.random.normal(noise_key, (n, mean.shape[1]))

    def _draw(self, networks, x, key, k, offsets=None) -> Draw:
        """k samples z ~ q(z | x) through every layer, and every density term at them. The bottom
        layer's noise comes from `key` itself, as in the one-layer VAE; layer l's from fold_in(key, l).
        `offsets`: per layer, a shift of each example's (mean, log-variance) [B, L_l] (a refined q)."""
        h, latents, log_q, kls, posteriors = x, [], [], [], []
        for index, encoder in enumerate(networks.encoders()):
            mean, log_var = _split(encoder(h))
            if offsets is not None:
                mean, log_var = mean + offsets[index][0], log_var + offsets[index][1]
            shape = (k, *mean.shape) if index == 0 else mean.shape
            eps = jax.random.normal(key if index == 0 else jax.random.fold_in(key, index), shape)
            h = mean + jnp.exp(0.5 * log_var) * eps  # [k, B, L_l]
            latents.append(h)
            log_q.append(objectives.gaussian_log_density(h, mean, log_var))
            posteriors.append((mean, log_var))
        log_p = [objectives.gaussian_log_density(z_below, *_split(decoder(z)))
                 for decoder, z_below, z in zip(networks.upper_decoders, latents, latents[1:])]
        log_p.append(self._log_prior(networks, latents[-1]))
        for index in range(len(latents)):
            if index == len(latents) - 1 and not self.vamp:  # KL(q(z_L | z_{L−1}) ‖ N(0, I)) in closed form
                kl = objectives.gaussian_kl(*posteriors[index])
                kls.append(kl if kl.ndim == 1 else jnp.mean(kl, axis=0))
            else:
                kls.append(jnp.mean(log_q[index] - log_p[index], axis=0))
        log_px_z = objectives.bernoulli_log_likelihood(x, networks.decoder(latents[0]))  # [k, B]
        return Draw(latents, log_px_z, log_p, log_q, kls)

    @staticmethod
    def _log_weights(draw: Draw, kl_weight=None):
        """log p(x, z) − log q(z | x) = log p(x | z_1) + Σ_l (log p_l − log q_l), [k, B]; with a
        `kl_weight` β the sum is weighed by it."""
        log_w = draw.log_px_z
        for log_p, log_q in zip(draw.log_p, draw.log_q):
            log_w = log_w + log_p - log_q if kl_weight is None else log_w + kl_weight * (log_p - log_q)
        return log_w

    def _metrics(self, draw: Draw):
        """Per-example loss (the negated training bound), neg-ELBO, −E log p(x|z_1), KL, and with
        several layers the KL of each."""
        recon = -jnp.mean(draw.log_px_z, axis=0)
        kl = sum(draw.kls[1:], start=draw.kls[0])
        # With one sample the closed-form KL gives a lower-variance ELBO than the density ratio.
        bound = -(recon + kl) if self.num_samples == 1 else objectives.log_mean_exp(self._log_weights(draw))
        metrics = {"loss": -bound, "neg_elbo": recon + kl, "recon": recon, "kl": kl}
        if len(draw.kls) > 1:
            metrics.update({f"kl_{layer}": value for layer, value in enumerate(draw.kls, 1)})
        return metrics

    def _objective(self, draw: Draw, metrics, kl_weight):
        """The batch's training loss: the negated bound, with the KL terms weighed by `kl_weight`
        and floored by the free bits when those are on."""
        if not self.warms_up and not self.free_bits:
            return jnp.mean(metrics["loss"])
        if self.num_samples > 1:
            return -jnp.mean(objectives.log_mean_exp(self._log_weights(draw, kl_weight)))
        kls = [jnp.mean(kl) for kl in draw.kls]
        if self.free_bits:
            kls = [jnp.maximum(self.free_bits, kl) for kl in kls]
        return jnp.mean(metrics["recon"]) + kl_weight * sum(kls)

    # The contract.

    def train_step(self, state: State, batch, key):
        kl_weight = 1.0 if state.steps is None else jnp.minimum(1.0, (state.steps + 1) / self.warmup_steps)

        def loss_fn(networks):
            draw = self._draw(networks, batch["x"], key, self.num_samples)
            metrics = jax.tree.map(jnp.mean, self._metrics(draw))
            return self._objective(draw, metrics, kl_weight), metrics

        (objective, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.nets)
        networks, opt_state = apply_gradients(self.optimizer, grads, state.nets, state.opt_state)
        if state.steps is not None or self.free_bits:
            metrics = {**metrics, "objective": objective}  # what the step descended
        if state.steps is not None:
            metrics = {**metrics, "kl_weight": kl_weight}
        return State(networks, opt_state, None if state.steps is None else state.steps + 1), metrics

    def evaluate(self, state: State, batch, key):
        return self._metrics(self._draw(state.nets, batch["x"], key, self.num_samples))

    def log_likelihood(self, state: State, x, key, num_samples: int):
        return objectives.log_mean_exp(self.log_weights(state, x, key, num_samples))

    def log_weights(self, state: State, x, key, num_samples: int, offsets=None):
        return self._log_weights(self._draw(state.nets, x, key, num_samples, offsets))

    def local_offsets(self, state: State, x):
        """The local parameters of a refined q (`dgm_cli.refinement`): a shift of every layer's mean
        and log-variance for each example of x [B, D], zero (the encoder's q) at the start."""
        return [(jnp.zeros((x.shape[0], size)), jnp.zeros((x.shape[0], size))) for size in self.latent_dims]

    def refinement_objective(self, state: State, x, offsets, key, num_samples: int):
        """(surrogate [B], ELBO [B]) of q shifted by `offsets`, the same: reparameterised."""
        elbo = jnp.mean(self.log_weights(state, x, key, num_samples, offsets), 0)
        return elbo, elbo

    def sample(self, state: State, key, n: int):
        prior_key, key = jax.random.split(key)
        z = self._sample_prior(state.nets, prior_key, n)
        for index, decoder in reversed(list(enumerate(state.nets.upper_decoders))):
            mean, log_var = _split(decoder(z))
            z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(jax.random.fold_in(key, index), mean.shape)
        return jax.nn.sigmoid(state.nets.decoder(z))

    def reconstruct(self, state: State, x, key):
        mean, _ = _split(state.nets.encoder(x))
        return jax.nn.sigmoid(state.nets.decoder(mean))

    def extra_pictures(self, state: State):
        if not self.vamp:
            return {}
        return {"pseudo_inputs": jnp.clip(state.nets.pseudo_inputs[...], 0.0, 1.0)}

    def annealing_path(self, state: State, x):
        """AIS's path for x [B, D] (`dgm_cli.annealing`): from q(z|x) to p(x, z) over every layer's z,
        by HMC; q(z_1 | x) is computed once for the batch."""
        networks = state.nets
        posterior = networks.encode(x)  # [B, L_1] each

        def draw(key, chains):
            return self._draw(networks, x, key, chains).latents

        def log_densities(latents):  # each [C, B, L_l]
            log_q = objectives.gaussian_log_density(latents[0], *posterior)
            log_p = objectives.bernoulli_log_likelihood(x, networks.decoder(latents[0]))
            for encoder, decoder, z_below, z in zip(networks.upper_encoders, networks.upper_decoders, latents, latents[1:]):
                log_q = log_q + objectives.gaussian_log_density(z, *_split(encoder(z_below)))
                log_p = log_p + objectives.gaussian_log_density(z_below, *_split(decoder(z)))
            return log_p + self._log_prior(networks, latents[-1]), log_q

        return annealing.Path(draw, log_densities)

    def active_units(self, state: State, x, key):
        """Active units per stochastic layer, bottom first (Burda et al. 2016): those whose
        posterior mean E_q[z_u | x] varies over the examples x [N, D] with variance above 10⁻².
        Above the bottom layer E_q[z_l | x] = E[μ_l | x] over draws of the layers below, which
        `_variance_of_posterior_means` estimates from M of them without counting their noise."""
        counts, h = [], x
        for index, encoder in enumerate(state.nets.encoders()):
            mean, log_var = _split(encoder(h))  # [N, L_1], then [M, N, L_l]
            shape = (ACTIVE_UNIT_SAMPLES, *mean.shape) if index == 0 else mean.shape
            # The plain variance over x of the draws' mean would add ≈ E_x[Var(μ_l | x)] / M, which
            # counted units whose mean is the same for every x but whose draws are noisy.
            variance = jnp.var(mean, axis=0) if index == 0 else _variance_of_posterior_means(mean)  # [L_l]
            counts.append(jnp.sum(variance > ACTIVE_UNIT_THRESHOLD))
            h = mean + jnp.exp(0.5 * log_var) * jax.random.normal(jax.random.fold_in(key, index), shape)
        return jnp.stack(counts)

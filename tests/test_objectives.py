"""The objectives and estimators against hand formulas and exact integration."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from omegaconf import OmegaConf

from dgm_cli import objectives
from dgm_cli.data import Spec
from dgm_cli.models.vae import VAE
from dgm_cli.steps import make_log_likelihood

def test_softplus_is_stable_and_exact():
    x = jnp.array([-1e30, -100.0, -3.0, 0.0, 2.5, 100.0, 1e30])
    expected = np.logaddexp(0.0, np.asarray(x, dtype=np.float64))
    np.testing.assert_allclose(objectives.softplus(x), expected, rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(jax.vmap(jax.grad(objectives.softplus))(x), jax.nn.sigmoid(x), rtol=1e-6)


def test_bernoulli_log_likelihood_matches_product_of_probabilities():
    logits = jnp.array([[-2.0, 0.0, 3.0], [1.0, -1.0, 0.5]])
    x = jnp.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    p = 1 / (1 + np.exp(-np.asarray(logits)))
    expected = np.log(np.prod(np.where(np.asarray(x) == 1, p, 1 - p), axis=-1))
    np.testing.assert_allclose(objectives.bernoulli_log_likelihood(x, logits), expected, rtol=1e-5)


def test_gaussian_kl_matches_the_formula_and_a_monte_carlo_estimate():
    mean, log_var = jnp.array([[0.5, -1.0]]), jnp.array([[0.2, -0.7]])
    var = np.exp(np.asarray(log_var))
    by_hand = 0.5 * np.sum(np.asarray(mean) ** 2 + var - np.asarray(log_var) - 1)
    np.testing.assert_allclose(objectives.gaussian_kl(mean, log_var), [by_hand], rtol=1e-6)
    z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(jax.random.key(0), (200_000, 2))
    monte_carlo = jnp.mean(
        objectives.gaussian_log_density(z, mean, log_var) - objectives.standard_normal_log_density(z)
    )
    assert abs(float(monte_carlo) - by_hand) < 0.01
    assert float(objectives.gaussian_kl(jnp.zeros((1, 3)), jnp.zeros((1, 3)))[0]) == 0.0


def test_gaussian_log_density_matches_scipy_formula():
    z, mean, log_var = jnp.array([0.3]), jnp.array([1.0]), jnp.array([math.log(4.0)])
    expected = -0.5 * math.log(2 * math.pi * 4.0) - (0.3 - 1.0) ** 2 / 8.0
    np.testing.assert_allclose(objectives.gaussian_log_density(z, mean, log_var), expected, rtol=1e-6)


def test_gaussian_log_densities_by_matrix_products_match_the_broadcast_formula():
    keys = jax.random.split(jax.random.key(0), 3)
    z = 3.0 * jax.random.normal(keys[0], (2, 5, 4))  # [..., L]
    means, log_vars = jax.random.normal(keys[1], (7, 4)), jax.random.uniform(keys[2], (7, 4), minval=-6.0, maxval=2.0)
    broadcast = objectives.gaussian_log_density(z[..., None, :], means, log_vars)  # [2, 5, 7]
    np.testing.assert_allclose(objectives.gaussian_log_densities(z, means, log_vars), broadcast, rtol=1e-5)
    grad = lambda f: jax.grad(lambda *a: jnp.sum(jax.nn.logsumexp(f(*a), -1)), argnums=(0, 1, 2))(z, means, log_vars)
    direct = lambda z, means, log_vars: objectives.gaussian_log_density(z[..., None, :], means, log_vars)
    for got, expected in zip(grad(objectives.gaussian_log_densities), grad(direct)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_gaussian_log_densities_keep_float32_precision_at_small_variances():
    """log σ² = −10 in 50 dimensions, K = 500 components spread as N(2, I), every z drawn from one of
    them, and every fourth component nearly a copy of the one before (pseudo-inputs can coincide).
    The expanded form's terms, ≈ Σ_j (μ_kj − c_j)² / σ² ≈ 10⁶ each, lost up to 2.3 nats to float32
    (0.55 centred); the direct formula's own error is ≈ 2⁻²⁴ Σ_j |log 2π + log σ² + ε_j²| ≈ 3·10⁻⁵:
    the bound, 10⁻³ nats, leaves it room. The float64 reference takes the same float32 inputs."""
    rng = np.random.default_rng(0)
    num, dim, n = 500, 50, 256
    means = np.repeat(2.0 + rng.standard_normal((num // 4, dim)), 4, axis=0) + 1e-4 * rng.standard_normal((num, dim))
    log_vars = np.full((num, dim), -10.0)
    component = rng.integers(0, num, n)
    z = means[component] + np.exp(0.5 * log_vars[component]) * rng.standard_normal((n, dim))  # [n, L]
    z, means, log_vars = (np.float32(a) for a in (z, means, log_vars))
    z64, means64, log_vars64 = (np.float64(a) for a in (z, means, log_vars))
    exact = -0.5 * np.sum(np.log(2 * np.pi) + log_vars64 + (z64[:, None] - means64) ** 2 / np.exp(log_vars64), -1)
    got = np.float64(jax.jit(objectives.gaussian_log_densities)(z, means, log_vars))  # [n, K]
    near = exact > exact.max(-1, keepdims=True) - 30.0  # the densities that weigh in any mixture of them
    assert near.sum(-1).min() >= 4  # the copies
    np.testing.assert_array_less(np.abs(got - exact)[near], 1e-3)
    log_mixture = lambda a: np.logaddexp.reduce(a, axis=-1)
    np.testing.assert_array_less(np.abs(log_mixture(got) - log_mixture(exact)), 1e-3)


def test_log_mean_exp():
    w = jnp.array([[0.0, -1e4], [math.log(3.0), -1e4 + 1]])
    np.testing.assert_allclose(objectives.log_mean_exp(w), [math.log(2.0), -1e4 + math.log((1 + math.e) / 2)], rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_vae():
    """A VAE with a 1-d latent on 6 pixels: small enough to integrate p(x) by quadrature."""
    config = OmegaConf.create({"name": "vae", "hidden": [8], "latent_dim": 1, "activation": "tanh", "num_samples": 1,
                               "prior": "standard", "num_pseudo_inputs": 1, "kl_warmup_epochs": 0, "free_bits": 0})
    model = VAE(config, Spec(5, (2, 3), None), lambda lr=None: optax.adam(1e-2))
    x = (jax.random.uniform(jax.random.key(4), (5, 6)) < 0.5).astype(jnp.float32)
    # A little training makes q a sensible proposal, as it is for a trained model.
    step = lambda state, key: model.train_step(state, {"x": x}, key)
    state, _ = jax.lax.scan(step, model.init(jax.random.key(3)), jax.random.split(jax.random.key(5), 500))
    z = jnp.linspace(-12.0, 12.0, 24001)[:, None]  # [Z, 1]
    log_joint = (
        objectives.bernoulli_log_likelihood(x[None], state.nets.decode(z)[:, None])  # [Z, B]
        + objectives.standard_normal_log_density(z)[:, None]
    )
    exact = jax.nn.logsumexp(log_joint, axis=0) + math.log(float(z[1, 0] - z[0, 0]))  # [B]
    return model, state, x, exact


@pytest.mark.slow
def test_importance_sampled_log_likelihood_converges_to_the_exact_value(tiny_vae):
    model, state, x, exact = tiny_vae
    estimate = model.log_likelihood(state, x, jax.random.key(0), 200_000)
    np.testing.assert_allclose(estimate, exact, atol=0.01)


@pytest.mark.slow
def test_importance_sampled_estimate_is_below_exact_on_average_and_tightens_with_k(tiny_vae):
    model, state, x, exact = tiny_vae
    keys = jax.random.split(jax.random.key(1), 2000)
    gaps = {
        k: float(jnp.mean(exact - jax.vmap(lambda key: model.log_likelihood(state, x, key, k))(keys)))
        for k in (1, 10, 100)
    }
    assert gaps[1] > gaps[10] > gaps[100] > -0.005  # Jensen: a lower bound in expectation
    neg_elbo = jnp.mean(jax.vmap(lambda key: model.evaluate(state, {"x": x}, key)["neg_elbo"])(keys[:200]), axis=0)
    assert bool(jnp.all(-neg_elbo <= exact + 1e-3))


def test_estimate_drawn_in_chunks_converges_too(tiny_vae):
    """Drawing the samples in chunks, to bound memory, leaves the estimator unbiased in log-sum."""
    model, state, x, exact = tiny_vae
    chunked, per_call = make_log_likelihood(model, num_samples=5000, sample_batch=1200)
    assert per_call == 1
    estimate = jnp.concatenate([chunked(state, x[i : i + 1], jax.random.key(i))["log_p"] for i in range(len(x))])
    np.testing.assert_allclose(estimate, exact, atol=0.05)

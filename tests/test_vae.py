"""The VAE with several stochastic layers, KL warm-up, free bits, the VampPrior and active units."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from omegaconf import OmegaConf

from dgm_cli import objectives, loop
from dgm_cli.data import Spec
from dgm_cli.errors import DgmError
from dgm_cli.models.vae import VAE, _variance_of_posterior_means
from tests.test_cli import dgm

X = (jax.random.uniform(jax.random.key(4), (6, 5)) < 0.5).astype(jnp.float32)  # [B, D]


def make_vae(data_dim=X.shape[1], steps_per_epoch=10, **overrides):
    config = {"name": "vae", "hidden": [[6], [4]], "latent_dim": [1, 1], "activation": "tanh", "num_samples": 1,
              "prior": "standard", "num_pseudo_inputs": 3, "kl_warmup_epochs": 0, "free_bits": 0, **overrides}

    def make_optimizer(lr=None):
        return optax.adam(1e-2)

    make_optimizer.steps_per_epoch = steps_per_epoch
    return VAE(OmegaConf.create(config), Spec(6, (1, data_dim), None), make_optimizer)


def trained(model, steps=300):
    """A little training makes q a sensible proposal, as it is for a trained model."""
    step = lambda state, key: model.train_step(state, {"x": X}, key)
    state, _ = jax.lax.scan(step, model.init(jax.random.key(3)), jax.random.split(jax.random.key(5), steps))
    return state


def exact_log_likelihood(model, state, x):
    """log p(x) of a two-layer model with 1-d latents, by quadrature over (z_1, z_2) on a grid."""
    grid, step = jnp.linspace(-10.0, 10.0, 801), 20.0 / 800
    z1, z2 = (g.reshape(-1, 1) for g in jnp.meshgrid(grid, grid, indexing="ij"))  # [G², 1] each
    nets = state.nets
    log_joint = (objectives.standard_normal_log_density(z2)
                 + objectives.gaussian_log_density(z1, *jnp.split(nets.upper_decoders[0](z2), 2, axis=-1)))[:, None]
    log_joint = log_joint + objectives.bernoulli_log_likelihood(x[None], nets.decoder(z1)[:, None])  # [G², B]
    return jax.nn.logsumexp(log_joint, axis=0) + 2 * math.log(step)


@pytest.fixture(scope="module")
def two_layers():
    model = make_vae()
    state = jax.jit(trained, static_argnums=0)(model)
    return model, state, jax.jit(exact_log_likelihood, static_argnums=0)(model, state, X)


def test_the_two_layer_estimate_converges_to_the_exact_log_likelihood(two_layers):
    model, state, exact = two_layers
    estimate = jax.jit(model.log_likelihood, static_argnums=3)(state, X, jax.random.key(0), 100_000)
    np.testing.assert_allclose(estimate, exact, atol=0.02)


def test_the_bounds_stay_below_the_exact_value_on_average_and_tighten_with_k(two_layers):
    model, state, exact = two_layers
    keys = jax.random.split(jax.random.key(1), 1000)
    gaps = {k: float(jnp.mean(exact - jax.jit(jax.vmap(lambda key: model.log_likelihood(state, X, key, k)))(keys)))
            for k in (1, 10, 100)}
    assert gaps[1] > gaps[10] > gaps[100] > -0.005, gaps
    neg_elbo = jnp.mean(jax.jit(jax.vmap(lambda key: model.evaluate(state, {"x": X}, key)["neg_elbo"]))(keys), 0)
    assert float(jnp.mean(-neg_elbo - exact)) < 0  # the ELBO with the top KL in closed form, too


@pytest.mark.parametrize("shaping", [{"kl_warmup_epochs": 2}, {"free_bits": 0.5}, {"kl_warmup_epochs": 1, "num_samples": 3}])
def test_warm_up_and_free_bits_change_the_training_objective_but_no_reported_metric(shaping):
    plain, shaped = make_vae(num_samples=shaping.get("num_samples", 1)), make_vae(**shaping)
    state = shaped.init(jax.random.key(0))
    batch, key = {"x": X}, jax.random.key(1)
    after_plain, plain_metrics = jax.jit(plain.train_step)(state._replace(steps=None), batch, key)
    after_shaped, shaped_metrics = jax.jit(shaped.train_step)(state, batch, key)
    for name, value in plain_metrics.items():
        np.testing.assert_allclose(shaped_metrics[name], value, rtol=1e-6)  # the plain bound, as reported
    assert abs(float(shaped_metrics["objective"]) - float(shaped_metrics["loss"])) > 1e-3  # the KL weighed or floored...
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(after_plain.nets), jax.tree.leaves(after_shaped.nets))]
    assert max(moved) > 1e-6  # ...and the step differs
    for name, value in plain.evaluate(after_plain, batch, key).items():  # evaluation knows no shaping
        np.testing.assert_array_equal(shaped.evaluate(after_plain._replace(steps=state.steps), batch, key)[name], value)


def test_warm_up_reaches_weight_one_after_its_epochs():
    model = make_vae(kl_warmup_epochs=2, steps_per_epoch=3)  # 6 steps
    state, weights = model.init(jax.random.key(0)), []
    for step in range(8):
        state, metrics = jax.jit(model.train_step)(state, {"x": X}, jax.random.key(step))
        weights.append(round(float(metrics["kl_weight"]), 4))
    assert weights == [0.1667, 0.3333, 0.5, 0.6667, 0.8333, 1.0, 1.0, 1.0]


def test_the_vamp_prior_is_the_mixture_of_the_posteriors_at_the_pseudo_inputs():
    model = make_vae(prior="vamp", hidden=[[6]], latent_dim=[2], num_pseudo_inputs=3)
    state = model.init(jax.random.key(0))
    z = jax.random.normal(jax.random.key(1), (4, 2))
    u = np.clip(np.asarray(state.nets.pseudo_inputs[...]), 0, 1)
    mean, log_var = np.split(np.asarray(state.nets.encoder(jnp.asarray(u)), np.float64), 2, axis=-1)  # [3, 2]
    by_hand = np.log(np.mean(np.exp(-0.5 * np.sum(np.log(2 * np.pi) + log_var[None] + (np.asarray(z)[:, None] - mean[None]) ** 2
                                                  / np.exp(log_var[None]), -1)), 1))
    np.testing.assert_allclose(model._log_prior(state.nets, z), by_hand, rtol=1e-5)
    assert model.extra_pictures(state)["pseudo_inputs"].shape == (3, X.shape[1])


def test_active_units_count_the_units_whose_posterior_mean_varies():
    model = make_vae(hidden=[[6], [4]], latent_dim=[3, 2])
    state = model.init(jax.random.key(0))
    x = (jax.random.uniform(jax.random.key(2), (500, X.shape[1])) < 0.5).astype(jnp.float32)
    # Kill the bottom layer's units 0 and 2 (their mean no longer depends on x) and the top's unit 1.
    last = state.nets.encoder.layers[-1]
    last.kernel[...] = last.kernel[...].at[:, jnp.array([0, 2])].set(0.0)
    top = state.nets.upper_encoders[0].layers[-1]
    top.kernel[...] = top.kernel[...].at[:, 1].set(0.0)
    for layer in (last, top):  # and make the live ones vary plainly
        layer.kernel[...] = layer.kernel[...] * 5.0
    # With z_1 drawn close to its mean, so that the top unit's E_q[z_2 | x] varies with x itself
    # (at the initial log σ² its variance over x was ≈ 0.011, and its M-draw mean's ≈ 0.18 was noise).
    last.kernel[...], last.bias[...] = last.kernel[...].at[:, 3:].set(0.0), last.bias[...].at[3:].set(-6.0)
    assert [int(c) for c in model.active_units(state, x, jax.random.key(3))] == [1, 1]


def test_active_units_above_the_bottom_layer_do_not_count_the_noise_of_the_draws():
    """The top layer's unit 0, μ_2,0 = tanh(z_1,1), reads only z_1's unit 1, whose mean is the same
    for every x but whose draws are wide: E_q[z_2,0 | x] is constant, yet the mean of M = 10 draws
    of μ_2,0 varies over x with variance ≈ Var(tanh(z_1,1)) / M ≈ 0.06, which the plain variance
    over x counted as active. Its unit 1, μ_2,1 = tanh(z_1,0), reads z_1's unit 0, which varies
    with x and is nearly exact: active (variance ≈ 0.3). With N = 4000 the corrected statistic of
    unit 0 has a standard error ≈ 0.06 √(2/N) ≈ 0.0015, well below the threshold 10⁻²."""
    model = make_vae(hidden=[[6], [4]], latent_dim=[2, 2])
    state = model.init(jax.random.key(0))
    x = (jax.random.uniform(jax.random.key(2), (4000, X.shape[1])) < 0.5).astype(jnp.float32)
    bottom, (top_in, top_out) = state.nets.encoder.layers[-1], state.nets.upper_encoders[0].layers
    # q(z_1 | x): unit 0 ~ N(5 NN(x)_0, e⁻¹²), unit 1 ~ N(0, 4) for every x.  [μ_0, μ_1, log σ²_0, log σ²_1]
    bottom.kernel[...] = bottom.kernel[...].at[:, 0].multiply(5.0).at[:, 1:].set(0.0)
    bottom.bias[...] = jnp.array([0.0, 0.0, -12.0, jnp.log(4.0)])
    # q(z_2 | z_1): hidden unit 0 is tanh(z_1,0), 1 is tanh(z_1,1); μ_2 = (hidden 1, hidden 0), log σ_2² = 0.
    top_in.kernel[...], top_in.bias[...] = jnp.eye(2, 4), jnp.zeros(4)
    top_out.kernel[...] = jnp.zeros((4, 4)).at[1, 0].set(1.0).at[0, 1].set(1.0)  # [hidden, (μ_2, log σ_2²)]
    top_out.bias[...] = jnp.zeros(4)
    assert [int(c) for c in jax.jit(model.active_units)(state, x, jax.random.key(3))] == [1, 1]  # was [1, 2]


def test_the_variance_of_posterior_means_leaves_out_the_noise_of_the_draws():
    """M draws μ = f(x) + noise at each of N examples: unit 0 has f = 0 and noise of variance 1,
    unit 1 an f that rises over the examples, Var_x(f) = 0.25, and noise whose variance rises with
    it, 4 on average. The plain variance of the draws' mean adds E_x[Var(μ | x)] / M to each; the
    estimate does not."""
    m, n = 10, 20_000
    u = jnp.linspace(0.0, 1.0, n)
    f = math.sqrt(3) * (u - 0.5)  # Var_x(f) = 3 / 12
    noise_sd = jnp.stack([jnp.ones(n), jnp.sqrt(8.0 * u)], -1)  # E_x[Var(μ | x)] = 1, 4
    draws = jnp.stack([jnp.zeros(n), f], -1) + noise_sd * jax.random.normal(jax.random.key(0), (m, n, 2))  # [M, N, 2]
    plain = jnp.var(jnp.mean(draws, axis=0), axis=0)
    np.testing.assert_allclose(plain, [0.1, 0.25 + 0.4], atol=0.01)  # the noise counted
    standard_error = np.sqrt(2 / n) * np.array([0.1, 0.4]) * 1.5  # of the mean of N squared noises / M, roomy
    assert np.all(np.abs(_variance_of_posterior_means(draws) - np.array([0.0, 0.25])) < 3 * standard_error)


@pytest.mark.parametrize("override,message", [
    (["model.latent_dim=[]"], "model.latent_dim must be a latent size, such as 20, or a list of them"),
    (["model.latent_dim=[100,50]"], r"with model.latent_dim=\[100, 50\], model.hidden must list the hidden sizes of each of its 2 "
                                    r"stochastic layers, such as \[\[200, 200\], \[100, 100\]\]; got \[400\]"),
    (["model.kl_warmup_epochs=-1"], "model.kl_warmup_epochs must be a non-negative number of epochs, got -1"),
    (["model.free_bits=-0.5"], "model.free_bits must be a non-negative number of nats per layer"),
    (["model.free_bits=1", "model.num_samples=5"], "model.free_bits floors each layer's KL in the ELBO"),
    (["model.prior=vamp", "model.num_pseudo_inputs=0"], "model.num_pseudo_inputs must be a positive integer, got 0"),
    (["model.prior=mog"], "unknown model.prior 'mog'; choose from: standard, vamp"),
])
def test_bad_settings(make_config, tmp_path, override, message):
    with pytest.raises(DgmError, match=message) as error:
        loop.run(make_config("model=vae", "dataset=digits", *override), tmp_path)
    assert "\n" not in str(error.value)


def test_a_two_layer_vamp_vae_with_warm_up_trains_and_reports_its_active_units(tmp_path):
    result = dgm("train", "model=vae", "dataset=digits", "model.hidden=[[32],[16]]", "model.latent_dim=[8,4]",
                 "model.prior=vamp", "model.num_pseudo_inputs=10", "model.kl_warmup_epochs=1", "trainer.epochs=2",
                 "trainer.diagnostics_every=1", "trainer.progress=false", "eval.num_samples=10",
                 "trainer.num_pictures=4", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["active_units"]) == 2 and all(0 <= c <= n for c, n in zip(summary["active_units"], [8, 4]))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"kl_1", "kl_2", "kl_weight", "objective"} <= set(next(r for r in records if r["split"] == "train"))
    assert [r["epoch"] for r in records if r["split"] == "diagnostics" and "active_units_2" in r] == [1, 2]
    assert (run / "samples" / "pseudo_inputs.png").is_file()

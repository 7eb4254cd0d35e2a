"""Annealed importance sampling (`dgm_cli.annealing`): against exact likelihoods of tiny models,
against importance sampling, and through `dgm train` and `dgm eval`."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hydra import compose, initialize_config_module

from dgm_cli import annealing, models, objectives
from dgm_cli.data import Spec
from dgm_cli.metrics import read_evaluations
from tests.conftest import QUICK
from tests.test_cli import assert_one_line_error, dgm

X = jnp.asarray([[1, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], jnp.float32)  # three 2 × 3 images


def build(*overrides):
    with initialize_config_module("dgm_cli.configs", version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return models.build(cfg.model, Spec(num_train=10, image_shape=(2, 3), num_classes=None),
                        lambda lr=None: optax.adam(1e-3))


def ais(path, steps, chains, seed=0, step_size=0.05):
    settings = annealing.Settings(steps, chains, leapfrog_steps=5, step_size=step_size, target_acceptance=0.65)
    return jax.jit(lambda key: annealing.log_likelihood(path, key, settings))(jax.random.key(seed))


@pytest.fixture(scope="module")
def sbn():
    """A two-layer SBN (3 and 2 units) whose generative net is sharpened, so that q is a poor fit,
    and the exact log p(x) of X by enumerating all 32 hidden states."""
    model = build("model=sbn", "model.layers=[3,2]", "model.deterministic_hidden=[]")
    state = model.init(jax.random.key(3))
    state = state._replace(generative=jax.tree.map(lambda p: 3 * p, state.generative))
    upper, lower = (jnp.asarray(list(itertools.product([0.0, 1.0], repeat=n))) for n in (3, 2))
    h1 = jnp.repeat(upper, 4, 0)[:, None, :].repeat(3, 1)  # [32, 3 images, 3]: every pair of states
    h2 = jnp.tile(lower, (8, 1))[:, None, :].repeat(3, 1)
    exact = jax.nn.logsumexp(state.generative.log_prob(X, [h1, h2]), axis=0)
    return model, state, exact


def test_ais_converges_to_the_exact_log_likelihood_of_a_tiny_sbn_and_rises_with_its_steps(sbn):
    model, state, exact = sbn
    assert abs(float(jnp.mean(exact - ais(model.annealing_path(state, X), 300, 200)["log_p"]))) < 0.01
    # Two chains on 100 copies of each image: the gap to log p(x) shrinks step by step (measured
    # 2.43, 0.68, 0.21, 0.08, 0.01 nats; a chain that did not move would keep IS's 2.43).
    path = model.annealing_path(state, jnp.tile(X, (100, 1)))
    gaps = [float(jnp.mean(jnp.tile(exact, 100) - ais(path, steps, 2)["log_p"])) for steps in (1, 3, 10, 30, 300)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[0] > 1.0 and gaps[-1] < 0.05, gaps


def test_ais_by_gibbs_over_categorical_units_converges_to_the_exact_log_likelihood():
    """Two variables of three categories (nine states, enumerated), the sweep's candidate values
    read in the order that starts from each variable's current one."""
    model = build("model=sbn", "model.units=categorical", "model.categories=3", "model.layers=[2]",
                  "model.deterministic_hidden=[]")
    state = model.init(jax.random.key(4))
    state = state._replace(generative=jax.tree.map(lambda p: 4 * p, state.generative))
    one_hot = jnp.eye(3)
    states = jnp.asarray([jnp.concatenate([one_hot[a], one_hot[b]]) for a in range(3) for b in range(3)])
    exact = jax.nn.logsumexp(state.generative.log_prob(X, [states[:, None, :].repeat(3, 1)]), axis=0)
    path = model.annealing_path(state, jnp.tile(X, (50, 1)))
    gaps = [float(jnp.mean(jnp.tile(exact, 50) - ais(path, steps, 2)["log_p"])) for steps in (1, 300)]
    assert gaps[0] > 0.3 and abs(gaps[1]) < 0.05, gaps


def test_one_intermediate_distribution_is_importance_sampling_from_q(sbn):
    model, state, exact = sbn
    path = model.annealing_path(state, X)
    found = ais(path, 1, 64, seed=5)
    draw_key, _ = jax.random.split(jax.random.key(5))
    log_p, log_q = path.log_densities(path.draw(draw_key, 64))  # the same 64 draws from q
    np.testing.assert_allclose(found["log_p"], objectives.log_mean_exp(log_p - log_q), rtol=1e-6)


@pytest.fixture(scope="module")
def vae():
    """A VAE with a one-dimensional latent and the log p(x) of X by quadrature: log ∫ p(x|z) N(z; 0, 1) dz
    on a fine grid."""
    model = build("model=vae", "model.hidden=[8]", "model.latent_dim=1")
    state = model.init(jax.random.key(1))
    z = jnp.linspace(-12.0, 12.0, 40001)[:, None, None].repeat(3, 1)
    log_joint = objectives.bernoulli_log_likelihood(X, state.nets.decoder(z)) + objectives.standard_normal_log_density(z)
    return model, state, jax.nn.logsumexp(log_joint, axis=0) + jnp.log(24.0 / 40000)


def test_ais_by_hmc_converges_to_a_vae_likelihood_by_quadrature(vae):
    model, state, exact = vae
    found = ais(model.annealing_path(state, X), 300, 100)
    np.testing.assert_allclose(found["log_p"], exact, atol=0.03)
    assert 0.3 < float(jnp.mean(found["acceptance"])) < 1.0  # the step size adapted, not frozen at an extreme


def test_annealing_schedule_runs_from_zero_to_one_densest_at_the_ends():
    beta = np.asarray(annealing.schedule(100))
    assert beta[0] == 0 and beta[-1] == 1 and np.all(np.diff(beta) > 0)
    steps = np.diff(beta)
    assert steps[0] < steps[50] and steps[-1] < steps[50]


def test_dgm_train_and_eval_keep_ais_beside_the_importance_sampled_headline(tmp_path):
    result = dgm("train", "model=sbn", "dataset=digits", "model.layers=[8]", *QUICK, "eval.method=ais",
                 "eval.ais_steps=20", "eval.ais_chains=3", "eval.num_images=40", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_nll_method"] == "is" and np.isfinite(summary["test_nll_ais"])
    assert summary["test_nll_ais_steps"] == 20 and summary["test_nll_ais_chains"] == 3
    records = read_evaluations(tmp_path / "run")
    assert [r["method"] for r in records] == ["is", "ais"] and all(r["images"] == 40 for r in records)
    result = dgm("eval", "run", "eval.method=ais", "eval.ais_steps=40", "eval.ais_chains=3", "eval.num_images=40",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "AIS, 40 steps × 3 chains" in result.stdout
    after = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert after["test_nll"] == summary["test_nll"] and after["test_nll_ais_steps"] == 40  # IS stays the headline
    assert [r["method"] for r in read_evaluations(tmp_path / "run")] == ["is", "ais", "ais"]
    quick = dgm("eval", "run", "eval.method=ais", "eval.ais_steps=5", "eval.ais_chains=3", "eval.num_images=40",
                cwd=tmp_path)
    assert quick.returncode == 0, quick.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["test_nll_ais_steps"] == 40  # kept: more steps
    report = dgm("report", "run", cwd=tmp_path)
    assert "test NLL by AIS" in report.stdout and f"{after['test_nll_ais']:.2f} ± " in report.stdout


@pytest.mark.parametrize("overrides, fragment", [
    (["model=loglinear", "eval.method=ais"], "exact"),
    (["eval.method=ais", "eval.ais_steps=0"], "eval.ais_steps"),
    (["eval.method=ais", "eval.ais_chains=0"], "eval.ais_chains"),
    (["eval.method=anneal"], "eval.method"),
    (["eval.num_images=0"], "eval.num_images"),
])
def test_bad_ais_settings_fail_in_one_line_before_training(tmp_path, overrides, fragment):
    result = dgm("train", "dataset=digits", *QUICK, *overrides, "hydra.run.dir=run", cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "run").exists()

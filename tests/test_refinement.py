"""Per-image refinement of q (`dgm_cli.refinement`), `eval.refine_steps` and `dgm gaps`."""

import json

import jax
import jax.numpy as jnp
import pytest
from omegaconf import OmegaConf

from dgm_cli import refinement
from dgm_cli.metrics import read_evaluations
from tests.conftest import QUICK
from tests.test_annealing import X, sbn, vae  # noqa: F401 (the tiny models' fixtures)
from tests.test_cli import assert_one_line_error, dgm


def elbo(model, state, offsets=None):
    return jnp.mean(model.log_weights(state, X, jax.random.key(9), 20_000, offsets), 0)


def test_the_refined_elbo_lies_between_the_amortised_one_and_log_p_on_a_tiny_sbn(sbn):
    model, state, exact = sbn
    offsets, curve = jax.jit(lambda key: refinement.refine(model, state, X, key, refinement.Settings(300, 3e-2, 10)))(
        jax.random.key(0))
    amortised, refined = elbo(model, state), elbo(model, state, offsets)
    assert bool(jnp.all(amortised + 0.5 < refined)) and bool(jnp.all(refined < exact)), (amortised, refined, exact)
    assert float(jnp.mean(curve[-30:])) > float(jnp.mean(curve[:30])) + 1.0  # it climbed


def test_the_refined_elbo_of_a_vae_closes_on_log_p_by_quadrature(vae):
    model, state, exact = vae
    offsets, _ = jax.jit(lambda key: refinement.refine(model, state, X, key, refinement.Settings(300, 3e-2, 10)))(
        jax.random.key(0))
    amortised, refined = elbo(model, state), elbo(model, state, offsets)
    # One Gaussian latent: the posterior is nearly Gaussian, so q* nearly closes the gap.
    assert bool(jnp.all(amortised < refined)) and bool(jnp.all(refined < exact + 1e-3))
    assert float(jnp.max(exact - refined)) < 0.05 < float(jnp.max(exact - amortised)), (amortised, refined, exact)


@pytest.fixture(scope="module")
def sbn_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("gaps")
    result = dgm("train", "model=sbn", "dataset=digits", "model.layers=[16]", *QUICK, "hydra.run.dir=run", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd


def test_dgm_gaps_splits_the_loss_into_approximation_and_amortisation(sbn_run):
    result = dgm("gaps", "run", "images=100", "steps=100", "elbo_samples=50", "eval.num_samples=200", cwd=sbn_run)
    assert result.returncode == 0, result.stderr
    assert "amortisation gap" in result.stdout and "approximation gap" in result.stdout
    gaps = json.loads((sbn_run / "run" / "gaps.json").read_text())
    assert gaps["images"] == 100 and gaps["steps"] == 100
    amortisation, approximation = gaps["amortisation_gap"], gaps["approximation_gap"]
    assert amortisation["mean"] > 3 * amortisation["stderr"] > 0  # two epochs' encoder: far from each q*
    assert approximation["mean"] > -3 * approximation["stderr"]
    total = gaps["log_p"]["mean"] - gaps["elbo"]["mean"]
    assert abs(total - amortisation["mean"] - approximation["mean"]) < 1e-6
    report = dgm("report", "run", cwd=sbn_run)
    assert report.returncode == 0 and f"{amortisation['mean']:.2f} ± {amortisation['stderr']:.2f}" in report.stdout


def test_refined_importance_sampling_is_kept_with_its_settings_even_for_a_run_saved_before_them(sbn_run):
    saved = sbn_run / "run" / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(saved)
    for key in ("refine_steps", "refine_lr", "refine_samples"):  # as a run saved before dgm had them
        del cfg.eval[key]
    OmegaConf.save(cfg, saved)
    result = dgm("eval", "run", "eval.refine_steps=20", "eval.num_images=50", cwd=sbn_run)
    assert result.returncode == 0, result.stderr
    record = read_evaluations(sbn_run / "run")[-1]
    assert record["refine_steps"] == 20 and record["refine_samples"] == 10 and record["images"] == 50


@pytest.mark.parametrize("command, fragment", [
    (["eval", "run", "eval.refine_steps=5", "eval.refine_samples=1"], "eval.refine_samples"),
    (["eval", "run", "eval.refine_steps=-1"], "eval.refine_steps"),
    (["gaps", "run", "images=0"], "images"),
    (["gaps", "run", "steps=many"], "steps=N"),
])
def test_bad_refinement_settings_fail_in_one_line(sbn_run, command, fragment):
    assert_one_line_error(dgm(*command, cwd=sbn_run), fragment)


def test_refinement_of_an_exact_likelihood_fails_in_one_line(tmp_path):
    result = dgm("train", "model=loglinear", "dataset=digits", *QUICK, "eval.refine_steps=5", "hydra.run.dir=run",
                 cwd=tmp_path)
    assert_one_line_error(result, "eval.refine_steps", "exact")

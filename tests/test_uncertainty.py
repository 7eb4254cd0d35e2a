"""Every figure with its evidence: standard errors over the test images, the k-curve and the
effective sample size of the importance sampler read off the same draws, and the intervals and
paired comparisons of `dgm report`."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgm_cli import loop, steps, uncertainty
from tests.conftest import QUICK
from tests.test_cli import assert_one_line_error, dgm
from tests.test_objectives import tiny_vae  # noqa: F401  (a fixture)


def test_the_k_curve_and_the_ess_come_from_the_same_draws_as_the_estimate(tiny_vae):  # noqa: F811
    """Drawn in chunks of 7 samples, the estimate from the first k of K = 50 samples equals the
    log-mean-exp of those k weights, and the ESS is (Σ w)² / Σ w² of all 50."""
    model, state, x, _ = tiny_vae
    num_samples, chunk = 50, 7
    log_likelihood, _ = steps.make_log_likelihood(model, num_samples, sample_batch=chunk)
    key = jax.random.key(11)
    found = log_likelihood(state, x, key)

    full_chunks, rest = divmod(num_samples, chunk)
    keys = jax.random.split(key, full_chunks + 1)
    log_w = jnp.concatenate([model.log_weights(state, x, k, chunk) for k in keys[:-1]]
                            + [model.log_weights(state, x, keys[-1], rest)])  # [K, B], as drawn
    counts = steps.curve_sample_counts(num_samples)
    assert counts == (1, 5, 10, 50)
    expected = np.stack([jax.nn.logsumexp(log_w[:k], axis=0) - math.log(k) for k in counts], axis=1)  # [B, C]
    np.testing.assert_allclose(found["log_p_by_k"], expected, rtol=1e-5)
    np.testing.assert_allclose(found["log_p"], expected[:, -1], rtol=1e-6)
    w = np.exp(np.asarray(log_w, np.float64) - np.max(np.asarray(log_w), axis=0))
    np.testing.assert_allclose(np.exp(found["log_ess"]), w.sum(0) ** 2 / (w**2).sum(0), rtol=1e-4)


def test_the_sample_counts_of_the_curve_end_with_a_tenfold_step():
    assert steps.curve_sample_counts(5000) == (1, 10, 100, 500, 1000, 5000)
    assert steps.curve_sample_counts(1000) == (1, 10, 100, 1000)
    assert steps.curve_sample_counts(5) == (1, 5)


def test_intervals_are_students_and_welchs():
    assert uncertainty.standard_error([1.0, 2.0, 3.0]) == pytest.approx(1 / math.sqrt(3))
    low, high = uncertainty.mean_interval([1.0, 2.0, 3.0])
    assert (low, high) == pytest.approx((2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)), rel=1e-6)
    assert uncertainty.mean_interval([1.0]) is None
    # Equal sizes and variances: Welch's degrees of freedom are 2(n − 1) = 4.
    low, high = uncertainty.difference_interval([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])
    assert (low, high) == pytest.approx((2 - 2.776445 * math.sqrt(2 / 3), 2 + 2.776445 * math.sqrt(2 / 3)), rel=1e-6)
    assert uncertainty.difference_interval([1.0, 2.0], [1.0]) is None


def test_the_convergence_verdict_compares_the_last_tenfold_step_with_the_standard_error():
    assert uncertainty.convergence({1: 99.0, 10: 95.0, 100: 94.2, 1000: 94.1}, stderr=0.3)[0]
    converged, why = uncertainty.convergence({1: 99.0, 10: 95.0, 100: 94.9, 1000: 94.1}, stderr=0.3)
    assert not converged and "from k = 100 to 1000 samples the NLL estimate fell by 0.800" in why
    assert not uncertainty.convergence({1: 99.0, 5: 97.0}, stderr=10.0)[0]  # no tenfold step to judge by
    equal_weights = {"log_p": np.zeros(4), "log_p_by_k": np.zeros((4, 2)), "log_ess": np.full(4, math.log(10))}
    figures = uncertainty.summarise(equal_weights, (1, 10))
    assert figures["ess_over_k_median"] == pytest.approx(1.0) and figures["ess_over_k_p5"] == pytest.approx(1.0)


@pytest.mark.parametrize("family", [["model=vae"], ["model=wakesleep", "model.layers=[8]"],
                                    ["model=sbn", "model.layers=[8]"], ["model=loglinear", "model.num_components=4"]])
def test_every_family_keeps_its_per_image_evidence(make_config, tmp_path, family):
    summary = loop.run(make_config("dataset=digits", *QUICK, *family), tmp_path)
    evaluation = json.loads((tmp_path / "evaluations.jsonl").read_text())
    log_p = np.load(tmp_path / summary["test_per_image"])
    assert log_p.dtype == np.float32 and log_p.shape == (300,)  # the test images of digits
    assert summary["test_nll"] == pytest.approx(-log_p.mean(), rel=1e-6)
    assert summary["test_nll_stderr"] == pytest.approx(log_p.std(ddof=1) / math.sqrt(len(log_p)), rel=1e-4)
    assert 0 < summary["test_nll_stderr"] < 1
    if family == ["model=loglinear", "model.num_components=4"]:
        assert evaluation["convergence"] == "exact" and summary["test_nll_converged"] is True
        assert "nll_by_samples" not in evaluation
    else:
        curve = evaluation["nll_by_samples"]
        assert list(curve) == ["1", "2", "10", "20"] and curve["20"] == pytest.approx(summary["test_nll"])
        assert curve["1"] > curve["20"]  # an importance-sampled bound tightens with k
        assert 0 < evaluation["ess_over_k_p5"] <= evaluation["ess_over_k_median"] <= 1
        assert summary["test_nll_converged"] is evaluation["converged"]


def test_the_keys_of_every_purpose_differ_under_both_threefry_settings():
    before = jax.config.jax_threefry_partitionable
    try:
        for partitionable in (False, True):
            jax.config.update("jax_threefry_partitionable", partitionable)
            keys = loop.Keys.from_seed(0)
            data = {name: tuple(np.asarray(jax.random.key_data(key)).ravel()) for name, key in keys._asdict().items()}
            assert len(set(data.values())) == len(data), (partitionable, data)
    finally:
        jax.config.update("jax_threefry_partitionable", before)


@pytest.mark.slow
def test_a_figure_that_has_not_converged_says_so_everywhere(tmp_path):
    result = dgm("train", "dataset=digits", *QUICK, "eval.num_samples=5", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "the test NLL has not converged: with 5 samples there is no tenfold increase" in result.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["test_nll_converged"] is False
    assert "(5 samples, not converged)" in dgm("report", "run", cwd=tmp_path).stdout


@pytest.mark.slow
def test_eval_refuses_data_that_changed_since_training(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {split: (rng.random((n, 16)) < 0.3).astype(np.uint8) for split, n in
              (("train", 200), ("validation", 50), ("test", 50))}
    np.savez(tmp_path / "data.npz", **arrays)
    args = ["dataset=numpy", f"dataset.path={tmp_path / 'data.npz'}", "model.hidden=[8]", "model.latent_dim=2"]
    assert dgm("train", *args, *QUICK, "hydra.run.dir=run", cwd=tmp_path).returncode == 0
    before = (tmp_path / "run" / "evaluations.jsonl").read_text()
    arrays["test"][0] = 1 - arrays["test"][0]
    np.savez(tmp_path / "data.npz", **arrays)
    assert_one_line_error(dgm("eval", "run", cwd=tmp_path), "changed since run was trained")
    assert (tmp_path / "run" / "evaluations.jsonl").read_text() == before

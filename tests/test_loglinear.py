"""The log-linear latent class model: EM's guarantees, its M-steps, its normaliser, its fit."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

from dgm_cli import data as data_lib
from dgm_cli import loop
from dgm_cli.data import Spec, sample_bars
from dgm_cli.errors import DgmError
from dgm_cli.models.loglinear import LogLinear

def no_run_optimizer(lr=None):
    raise AssertionError("EM has no use for the run's optimizer and schedule")


def make_model(spec, **overrides):
    config = {"name": "loglinear", "num_components": 4, "features": "pixel", "prior": "learned",
              "m_step": "exact", "m_step_iters": 50, "m_step_optimizer": {"name": "adam", "lr": 0.05},
              "smoothing": 0.5, "stepwise_decay": 0.7, "max_states": 65536, "observed_z": False, **overrides}
    return LogLinear(OmegaConf.create(config), spec, no_run_optimizer)


BARS = jnp.asarray(sample_bars(np.random.default_rng(0), 300, 3, 0.3, 0.5), jnp.float32)  # [300, 9]
BARS_SPEC = Spec(num_train=300, image_shape=(3, 3), num_classes=None)


def map_objective(model, state, x):
    """What EM with smoothing α climbs: Σ_n log p(x_n) + 2α Σ_z E_uniform[log p(X | z)] + α Σ_z log p(z)."""
    log_p = jax.nn.logsumexp(model._log_joint(state, x), axis=-1)
    log_z = model.features.log_normalizer(state.weights)
    virtual = jnp.sum(state.weights @ model.features.uniform_mean() - log_z)
    return jnp.sum(log_p) + 2 * model.smoothing * virtual + model.smoothing * jnp.sum(jax.nn.log_softmax(state.prior_logits))


@pytest.mark.parametrize("features", ["pixel", "pairwise"])
def test_full_batch_em_never_decreases_its_objective(features):
    m_step = "exact" if features == "pixel" else "gradient"
    model = make_model(BARS_SPEC, features=features, m_step=m_step, m_step_iters=300,
                       m_step_optimizer={"name": "sgd", "lr": 0.2})  # small steps: each M-step improves Q
    state = model.init(jax.random.key(0))
    step = jax.jit(lambda state: model.train_step(state, {"x": BARS}, None)[0])
    values = []
    for _ in range(15):
        values.append(float(map_objective(model, state, BARS)))
        state = step(state)
    assert np.all(np.diff(values) > -1e-3), values
    assert values[-1] > values[0] + 10


def test_gradient_m_step_converges_to_the_exact_m_step(make_config):
    # The shipped M-step optimizer, with more steps than the shipped 50.
    default = make_config("model=loglinear").model.m_step_optimizer
    model = make_model(BARS_SPEC, m_step_iters=1000, m_step_optimizer=default)
    state = model.init(jax.random.key(1))
    responsibilities = jax.nn.softmax(model._log_joint(state, BARS), axis=-1)
    statistics, counts = responsibilities.T @ BARS / len(BARS), responsibilities.mean(0)
    exact = model._exact_m_step(state.weights, statistics, counts)
    gradient = model._gradient_m_step(state.weights, statistics, counts)
    np.testing.assert_allclose(jax.nn.sigmoid(gradient), jax.nn.sigmoid(exact), atol=1e-4)


@pytest.mark.slow
def test_the_readme_gradient_em_command_learns_the_bars(make_config, tmp_path):
    """`dgm train model=loglinear dataset=bars model.features=pairwise model.m_step=gradient`, for
    5 of its 30 EM iterations: from about 11 nats, 8.6 above the bars' exact 2.50, to 2.67 (2.64
    and 2.65 with seeds 1 and 2). With the run's optimizer (adam, lr 1e-3) in the M-step, 9.2."""
    summary = loop.run(make_config("model=loglinear", "dataset=bars", "model.features=pairwise",
                                    "model.m_step=gradient", "trainer.epochs=5", "trainer.progress=false"), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    start = records[0]["loss"]  # the first iteration's −log p(x) on train: before any M-step
    assert records[0]["split"] == "train" and start > summary["true_test_nll"] + 5
    assert summary["test_nll"] - summary["true_test_nll"] < 0.3, summary
    assert summary["test_nll"] > summary["true_test_nll"] - 0.1  # no model beats the generating process


@pytest.mark.parametrize("features", ["pixel", "pairwise"])
def test_exact_log_likelihood_matches_an_independent_numpy_computation(features):
    """log p(x) = log Σ_z p(z) exp(w_zᵀφ(x)) / Z_z, in float64 from the definitions: for pixel
    features the Bernoulli mixture formula, for pairwise ones by enumerating all 2^6 images."""
    spec = Spec(10, (2, 3), None)
    model = make_model(spec, features=features, m_step="gradient")
    keys = jax.random.split(jax.random.key(5), 3)
    state = model.init(keys[0])._replace(weights=2 * jax.random.normal(keys[1], (4, model.features.size)),
                                         prior_logits=jax.random.normal(keys[2], (4,)))
    x = np.array(list(itertools.product([0, 1], repeat=6)), dtype=np.float64)[::3]  # [22, 6]
    w, b = np.asarray(state.weights, np.float64), np.asarray(state.prior_logits, np.float64)
    prior = np.exp(b) / np.exp(b).sum()  # [K]
    if features == "pixel":
        probabilities = 1 / (1 + np.exp(-w))  # [K, D]
        likelihood = np.prod(np.where(x[:, None] == 1, probabilities, 1 - probabilities), axis=-1)  # [N, K]
    else:
        pairs = [(0, 1), (1, 2), (3, 4), (4, 5), (0, 3), (1, 4), (2, 5)]  # the 2×3 grid, by hand

        def phi(images):
            return np.concatenate([images, np.stack([images[:, i] * images[:, j] for i, j in pairs], 1)], 1)

        everything = np.array(list(itertools.product([0, 1], repeat=6)), dtype=np.float64)
        unnormalised = np.exp(phi(x) @ w.T)  # [N, K]
        likelihood = unnormalised / np.exp(phi(everything) @ w.T).sum(0)
    expected = np.log(likelihood @ prior)  # [N]
    np.testing.assert_allclose(model.log_likelihood(state, jnp.asarray(x, jnp.float32), None, 1), expected, rtol=1e-5)
    np.testing.assert_allclose(model.evaluate(state, {"x": jnp.asarray(x, jnp.float32)}, None)["loss"], -expected, rtol=1e-5)


def test_pairwise_normaliser_matches_brute_force():
    model = make_model(Spec(10, (2, 3), None), features="pairwise", m_step="gradient")
    weights = jax.random.normal(jax.random.key(2), (4, model.features.size))  # [K, 6 + 7 pairs]
    pairs = [(0, 1), (1, 2), (3, 4), (4, 5), (0, 3), (1, 4), (2, 5)]  # 2×3 grid, by hand
    by_hand = []
    for w in np.asarray(weights, dtype=np.float64):
        energies = [w[:6] @ x + sum(w[6 + k] * x[i] * x[j] for k, (i, j) in enumerate(pairs))
                    for x in map(np.array, itertools.product([0, 1], repeat=6))]
        by_hand.append(np.log(np.sum(np.exp(energies))))
    np.testing.assert_allclose(model.features.log_normalizer(weights), by_hand, rtol=1e-5)


@pytest.mark.slow
def test_learns_a_known_mixture_down_to_its_entropy(make_config, tmp_path):
    rng = np.random.default_rng(3)
    means, weights = rng.uniform(0.05, 0.95, (3, 12)), np.array([0.5, 0.3, 0.2])

    def sample(n):
        z = rng.choice(3, n, p=weights)
        return (rng.random((n, 12)) < means[z]).astype(np.uint8)

    arrays = {"train": sample(4000), "validation": sample(1000), "test": sample(4000)}
    np.savez(tmp_path / "mixture.npz", **arrays)
    x = arrays["test"][:, None, :]
    true_nll = -np.mean(np.log(np.sum(weights * np.prod(np.where(x == 1, means, 1 - means), axis=-1), axis=-1)))
    summary = loop.run(make_config("model=loglinear", "model.num_components=3", "dataset=numpy",
                                    f"dataset.path={tmp_path / 'mixture.npz'}", "trainer.epochs=60",
                                    "trainer.progress=false"), tmp_path / "run")
    assert summary["test_nll_samples"] == 0  # exact, with no samples
    assert true_nll - 0.05 < summary["test_nll"] < true_nll + 0.05, (summary["test_nll"], true_nll)
    assert (tmp_path / "run" / "samples" / "components.png").is_file()


@pytest.mark.slow
def test_observed_z_fits_each_class_to_its_own_examples(make_config, tmp_path):
    summary = loop.run(make_config("model=loglinear", "dataset=digits", "model.observed_z=true",
                                    "trainer.epochs=2", "trainer.progress=false"), tmp_path)
    assert np.isfinite(summary["test_nll"])
    # The closed-form M-step on labelled data: each class's smoothed pixel means.
    digits = data_lib.load(make_config("dataset=digits").dataset)
    model = make_model(digits.spec, num_components=10, observed_z=True, smoothing=1e-3)
    batch = {"x": jnp.asarray(digits.train, jnp.float32), "labels": jnp.asarray(digits.labels["train"])}
    state, _ = model.train_step(model.init(jax.random.key(0)), batch, None)
    threes = digits.train[digits.labels["train"] == 3]
    np.testing.assert_allclose(jax.nn.sigmoid(state.weights[3]), (threes.sum(0) + 1e-3) / (len(threes) + 2e-3), atol=1e-5)


def test_stepwise_em_on_minibatches_learns(make_config, tmp_path):
    summary = loop.run(make_config("model=loglinear", "dataset=digits", "trainer.batch_size=100",
                                    "trainer.epochs=5", "trainer.progress=false"), tmp_path)
    assert summary["test_nll"] < 25  # independent pixels: about 28 nats


@pytest.mark.parametrize("overrides,message", [
    (["model.features=pairwise", "model.m_step=gradient"], r"2\^64 images x' in X, which cannot be enumerated"),
    (["model.num_components=0"], "model.num_components must be a positive integer"),
    (["dataset=bars", "model.features=pairwise"], "model.m_step=exact has a closed form for pixel features only"),
    (["dataset=bars", "model.observed_z=true"], "needs a data set with labels"),
    (["model.observed_z=true"], "set model.num_components=10"),
    (["model.prior=flat"], "unknown model.prior 'flat'; choose from: learned, uniform"),
    (["model.m_step_optimizer.lr=0"], "model.m_step_optimizer.lr must be a positive number, got 0"),
    (["model.m_step_optimizer.name=adamax"], "unknown model.m_step_optimizer 'adamax'; choose from: adam, adamw"),
    (["+model.m_step_optimizer.b3=0.9"], "model.m_step_optimizer adam: .*b3"),
])
def test_bad_settings(make_config, tmp_path, overrides, message):
    dataset = [] if any(o.startswith("dataset=") for o in overrides) else ["dataset=digits"]
    with pytest.raises(DgmError, match=message):
        loop.run(make_config("model=loglinear", "model.num_components=4", *dataset, *overrides), tmp_path)

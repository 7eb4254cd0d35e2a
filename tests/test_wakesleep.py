"""Wake-sleep against exact enumeration and hand-derived gradients, and on bars against the truth."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from omegaconf import OmegaConf

from dgm_cli import loop
from dgm_cli.data import Spec
from dgm_cli.errors import DgmError
from dgm_cli.bernoulli import bernoulli, bernoulli_16bit
from dgm_cli.models.wakesleep import WakeSleep


def make_model(layers, data_dim=6, lr=1.0, **overrides):
    config = {"name": "wakesleep", "layers": layers, "deterministic_hidden": [], "activation": "tanh",
              "num_samples": 1, "q_update": "sleep", "sleep_lr": None, **overrides}
    # Plain SGD at rate 1: one step moves the parameters by exactly the negated loss gradient.
    spec = Spec(num_train=4, image_shape=(1, data_dim), num_classes=None)
    return WakeSleep(OmegaConf.create(config), spec, lambda lr_=None: optax.sgd(lr if lr_ is None else lr_))


def perturbed(module, seed, scale=1.5):
    leaves, treedef = jax.tree.flatten(module)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [leaf + scale * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)])


def random_state(model, seed=0):
    """Initial parameters pushed far from zero, so that no distribution is near uniform."""
    state = model.init(jax.random.key(seed))
    return state._replace(generative=perturbed(state.generative, seed + 1),
                          recognition=perturbed(state.recognition, seed + 2))


def exact_log_likelihood(model, state, x):
    """log Σ_h p(x, h), enumerating every configuration of every hidden layer."""
    configurations = [jnp.array(list(itertools.product([0.0, 1.0], repeat=size))) for size in model.layers]
    joint = []
    for hidden in itertools.product(*[range(len(c)) for c in configurations]):
        layers = [jnp.broadcast_to(c[i], (x.shape[0], c.shape[1])) for c, i in zip(configurations, hidden)]
        joint.append(state.generative.log_prob(x, layers))
    return jax.nn.logsumexp(jnp.stack(joint), axis=0)


X = (jax.random.uniform(jax.random.key(9), (4, 6)) < 0.4).astype(jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("layers", [[4], [3, 2]])
def test_importance_sampled_log_likelihood_converges_to_enumeration(layers):
    model = make_model(layers)
    state = random_state(model)
    state = state._replace(recognition=model.init(jax.random.key(1)).recognition)  # a broad proposal
    exact = exact_log_likelihood(model, state, X)
    estimate = model.log_likelihood(state, X, jax.random.key(0), 200_000)
    np.testing.assert_allclose(estimate, exact, atol=0.02)
    few = jnp.mean(jax.vmap(lambda k: model.log_likelihood(state, X, k, 2))(jax.random.split(jax.random.key(1), 500)), 0)
    assert bool(jnp.all(few < exact))  # a lower bound on average


@pytest.mark.parametrize("draw", [bernoulli_16bit, bernoulli])
def test_bernoulli_draws_have_the_right_frequencies(draw):
    p = jnp.array([0.0, 1e-3, 0.3, 0.5, 0.999, 1.0])
    draws = draw(jax.random.key(0), p, (200_000, 6))
    assert draws.dtype == jnp.bool_ and draws.shape == (200_000, 6)
    np.testing.assert_allclose(draws.mean(0), p, atol=3e-3)
    assert not draws[:, 0].any() and draws[:, 5].all()


def fire_counts(draw, p, n, chunk=2**21):
    """How often each unit of p fires in n draws, drawn a chunk at a time to bound the memory."""
    keys = jax.random.split(jax.random.key(0), n // chunk)
    return jax.lax.map(lambda key: draw(key, p, (chunk, len(p))).sum(0), keys).sum(0)


@pytest.mark.parametrize("draw,n", [(bernoulli_16bit, 2**22), (bernoulli, 2**27)])
def test_bernoulli_draws_at_small_p_fire_as_often_as_p_says(draw, n):
    """Comparing u with p·2^n made any p > 0 fire at 2^-n at least: the 16-bit draw at 1.5e-5,
    jax.random.bernoulli at 2^-23. Here that was 64 fires of each unit, and 16 of the one at 1e-9."""
    p = jnp.array([1e-9, 1e-6])
    expected = n * np.asarray(p)
    counts = fire_counts(draw, p, n)
    low, high = scipy.stats.poisson.ppf(1e-6, expected), scipy.stats.poisson.isf(1e-6, expected)
    assert np.all((low <= counts) & (counts <= high)), (counts, low, high)  # each bound: 1e-6 of Poisson(n·p)


def test_the_24_bit_draw_keeps_the_bits_of_jax_random_bernoulli():
    """So that log-likelihoods measured before the draw was rounded used almost the same draws."""
    p = jax.random.uniform(jax.random.key(1), (1000, 100))
    assert int(jnp.sum(bernoulli(jax.random.key(2), p, p.shape) != jax.random.bernoulli(jax.random.key(2), p))) <= 1


def linear(layer):
    return layer.kernel[...], layer.bias[...]


@pytest.mark.slow
def test_wake_gradient_is_the_hand_derived_delta_rule():
    model = make_model([3])
    state = random_state(model)
    new_state, _ = model.train_step(state, {"x": X}, jax.random.key(5))
    # The same draw h ~ q(h|x) that the step made, from the same key.
    [h], _ = state.recognition.sample(X, jax.random.split(jax.random.key(5))[0], 1)
    h = h[0]  # [B, 3]
    kernel, bias = linear(state.generative.chain.conditionals[0].layers[0])
    error = X - jax.nn.sigmoid(h @ kernel + bias)  # ∂ log p(x|h) / ∂ logits
    prior = state.generative.prior_logits[...]
    new_kernel, new_bias = linear(new_state.generative.chain.conditionals[0].layers[0])
    np.testing.assert_allclose(new_kernel - kernel, h.T @ error / len(X), atol=1e-5)
    np.testing.assert_allclose(new_bias - bias, error.mean(0), atol=1e-5)
    np.testing.assert_allclose(new_state.generative.prior_logits[...] - prior,
                               (h - jax.nn.sigmoid(prior)).mean(0), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layers", [[3], [3, 2]])
def test_sleep_gradient_is_the_delta_rule_on_dreams(layers):
    model = make_model(layers)
    state = random_state(model)
    new_state, _ = model.train_step(state, {"x": X}, jax.random.key(5))
    dream_x, dream_h = state.generative.sample(jax.random.split(jax.random.key(5))[1], len(X), bernoulli_16bit)
    # Each layer of q learns to predict the dream's layer above from the one below: x̃ -> h̃_1 -> h̃_2.
    for old, new, below, above in zip(state.recognition.conditionals, new_state.recognition.conditionals,
                                      [dream_x, *dream_h[:-1]], dream_h, strict=True):
        kernel, bias = linear(old.layers[0])
        error = above - jax.nn.sigmoid(below @ kernel + bias)
        new_kernel, new_bias = linear(new.layers[0])
        np.testing.assert_allclose(new_kernel - kernel, below.T @ error / len(X), atol=1e-5)
        np.testing.assert_allclose(new_bias - bias, error.mean(0), atol=1e-5)


@pytest.mark.slow
def test_reweighted_wake_updates_weigh_samples_by_normalised_importance_weights():
    model = make_model([3], num_samples=4, q_update="wake")
    state = random_state(model)
    new_state, _ = model.train_step(state, {"x": X}, jax.random.key(5))
    [h], log_q = state.recognition.sample(X, jax.random.split(jax.random.key(5))[0], 4)  # [K, B, 3]
    weights = jax.nn.softmax(state.generative.log_prob(X, [h]) - log_q, axis=0)[..., None]  # [K, B, 1]
    kernel, bias = linear(state.generative.chain.conditionals[0].layers[0])
    error = X - jax.nn.sigmoid(h @ kernel + bias)  # [K, B, D]
    expected = jnp.einsum("kbh,kbd->hd", weights * h, error) / len(X)
    np.testing.assert_allclose(linear(new_state.generative.chain.conditionals[0].layers[0])[0] - kernel, expected, atol=1e-5)
    # q learns in the wake phase only: its update is Σ_k w̃_k ∇ log q(h_k | x).
    q_kernel, q_bias = linear(state.recognition.conditionals[0].layers[0])
    q_error = h - jax.nn.sigmoid(X @ q_kernel + q_bias)
    q_expected = jnp.einsum("bd,kbh->dh", X, weights * q_error) / len(X)
    np.testing.assert_allclose(linear(new_state.recognition.conditionals[0].layers[0])[0] - q_kernel, q_expected, atol=1e-5)


@pytest.mark.slow
def test_both_phases_update_q_by_the_sum_of_the_sleep_and_the_wake_update():
    updates = {}
    for q_update in ["sleep", "wake", "both"]:
        model = make_model([3, 2], num_samples=4, q_update=q_update)
        state = random_state(model)
        new_state, _ = model.train_step(state, {"x": X}, jax.random.key(5))  # the same draws each time
        updates[q_update] = [new - old for new, old in zip(jax.tree.leaves(new_state.recognition),
                                                           jax.tree.leaves(state.recognition))]
    for both, sleep, wake in zip(updates["both"], updates["sleep"], updates["wake"], strict=True):
        np.testing.assert_allclose(both, sleep + wake, atol=1e-5)
    assert all(float(jnp.abs(update).max()) > 1e-3 for update in updates["sleep"] + updates["wake"])


@pytest.mark.slow
def test_classic_wake_sleep_learns_the_bars(make_config, tmp_path):
    summary = loop.run(make_config(
        "model=wakesleep", "model.layers=[8,1]", "dataset=bars", "trainer.epochs=40",
        "trainer.batch_size=20", "optimizer.lr=0.03", "trainer.progress=false", "eval.num_samples=500"), tmp_path)
    # 16 independent pixels would cost 8 nats here; the bars' entropy is 2.5.
    assert summary["true_test_nll"] - 0.2 < summary["test_nll"] < summary["true_test_nll"] + 1.5, summary


@pytest.mark.parametrize("override,message", [
    ("model.layers=[]", "model.layers must name at least one layer"),
    ("model.num_samples=0", "model.num_samples must be a positive integer"),
    ("model.q_update=never", "unknown model.q_update 'never'; choose from: both, sleep, wake"),
    ("model.sleep_lr=-1", "model.sleep_lr must be a positive number"),
    ("model.q_update=wake", "model.q_update=wake with model.num_samples=1 leaves q untrained: .* use "
                            "model.q_update=sleep or both, or model.num_samples > 1"),
])
def test_bad_settings(make_config, tmp_path, override, message):
    with pytest.raises(DgmError, match=message):
        loop.run(make_config("model=wakesleep", "dataset=digits", override), tmp_path)

"""Optimizers and schedules: each schedule applies the learning rate it is configured to, each
optimizer trains, and a bad setting is refused in one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgm_cli import data as data_lib
from dgm_cli import models, optim
from dgm_cli.errors import DgmError

EPOCHS, STEPS_PER_EPOCH = 10, 4  # T = 40 steps
T = EPOCHS * STEPS_PER_EPOCH


def applied_learning_rates(make_config, *overrides):
    """The learning rate of each of the run's T steps, read off plain SGD (no momentum): its update
    for a gradient of −1 is the learning rate itself."""
    cfg = make_config("optimizer=sgd", "optimizer.lr=0.1", "optimizer.momentum=null", *overrides)
    optimizer = optim.optimizer_factory(cfg.optimizer, cfg.schedule, EPOCHS, STEPS_PER_EPOCH)()

    def step(opt_state, _):
        updates, opt_state = optimizer.update(-jnp.ones(()), opt_state, jnp.zeros(()))
        return opt_state, updates

    _, rates = jax.lax.scan(step, optimizer.init(jnp.zeros(())), length=T)
    return np.asarray(rates)


def cosine(t, lr, final_fraction, start, length):
    return lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + np.cos(np.pi * (t - start) / length)))


STEPS = np.arange(T)


@pytest.mark.parametrize("overrides,expected", [
    (["schedule=constant"], np.full(T, 0.1)),
    (["schedule=cosine"], cosine(STEPS, 0.1, 0.0, 0, T)),  # from lr down to 0 at the end
    # Two warm-up epochs (8 steps) rising from 0, then down to a tenth of lr.
    (["schedule=cosine", "schedule.warmup_epochs=2", "schedule.final_fraction=0.1"],
     np.where(STEPS < 8, 0.1 * STEPS / 8, cosine(STEPS, 0.1, 0.1, 8, T - 8))),
    # Halved every 2.5 epochs (10 steps), smoothly.
    (["schedule=exponential", "schedule.decay_rate=0.5", "schedule.decay_epochs=2.5"], 0.1 * 0.5 ** (STEPS / 10)),
])
def test_each_schedule_applies_the_learning_rate_it_is_configured_to(make_config, overrides, expected):
    rates = applied_learning_rates(make_config, *overrides)
    np.testing.assert_allclose(rates, expected, rtol=1e-4, atol=1e-7)


def test_schedules_reach_the_rates_they_promise(make_config):
    """The same, said at the start, the middle and the end of the run."""
    cosine_rates = applied_learning_rates(make_config, "schedule=cosine")
    assert cosine_rates[0] == pytest.approx(0.1) and cosine_rates[T // 2] == pytest.approx(0.05)
    assert cosine_rates[-1] < 0.001
    decayed = applied_learning_rates(make_config, "schedule=exponential", "schedule.decay_epochs=5")
    assert decayed[0] == pytest.approx(0.1) and decayed[T // 2] == pytest.approx(0.05, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "rmsprop"])
def test_each_optimizer_trains_at_its_configured_settings(make_config, optimizer):
    cfg = make_config("dataset=digits", f"optimizer={optimizer}")
    digits = data_lib.load(cfg.dataset)
    make_optimizer = optim.optimizer_factory(cfg.optimizer, cfg.schedule, epochs=1, steps_per_epoch=50)
    model = models.build(cfg.model, digits.spec, make_optimizer)
    batch = {"x": jnp.asarray(digits.train[:256], jnp.float32)}
    key = jax.random.key(1)  # the same noise every step: a fixed objective that must go down

    def step(state, _):
        state, metrics = model.train_step(state, batch, key)
        return state, metrics["loss"]

    _, losses = jax.jit(lambda state: jax.lax.scan(step, state, length=50))(model.init(jax.random.key(0)))
    losses = np.asarray(losses)
    # About 52 nats at the start, 15 to 20 after 50 steps with each optimizer's defaults.
    assert np.all(np.isfinite(losses)) and losses[-5:].mean() < losses[0] - 20, losses[[0, -1]]


@pytest.mark.parametrize("overrides,message", [
    (["schedule=cosine", "schedule.final_fraction=-1"], r"schedule.final_fraction must lie in \[0, 1\] .*got -1"),
    (["schedule=cosine", "schedule.final_fraction=1.5"], r"schedule.final_fraction must lie in \[0, 1\]"),
    (["schedule=cosine", "schedule.warmup_epochs=-1"], "schedule.warmup_epochs must be a non-negative number, got -1"),
    (["schedule=cosine", "schedule.warmup_epochs=soon"], "schedule.warmup_epochs must be a non-negative number, got 'soon'"),
    (["schedule=exponential", "schedule.decay_rate=0"], "schedule.decay_rate must be a positive number, got 0"),
    (["schedule=exponential", "schedule.decay_rate=-0.5"], "schedule.decay_rate must be a positive number"),
    (["schedule=exponential", "schedule.decay_epochs=0"], "schedule.decay_epochs must be a positive number, got 0"),
    (["schedule=exponential", "schedule.decay_epochs=null"], "schedule.decay_epochs must be a positive number, got None"),
    (["schedule.name=linear"], "unknown schedule 'linear'; choose from: constant, cosine, exponential"),
    (["optimizer.clip_norm=0"], "optimizer.clip_norm must be a positive number"),
])
def test_bad_schedule_and_optimizer_settings_are_refused(make_config, overrides, message):
    cfg = make_config(*overrides)
    with pytest.raises(DgmError, match=message):
        optim.optimizer_factory(cfg.optimizer, cfg.schedule, EPOCHS, STEPS_PER_EPOCH)


def test_a_fraction_of_a_step_per_decay_still_decays(make_config):
    """Full-batch training has one step per epoch: decay_epochs=0.5 halves the rate twice a step,
    rather than rounding to 0 steps, which optax would take for a constant rate."""
    cfg = make_config("optimizer=sgd", "optimizer.lr=0.1", "optimizer.momentum=null", "schedule=exponential",
                      "schedule.decay_epochs=0.5")
    optimizer = optim.optimizer_factory(cfg.optimizer, cfg.schedule, epochs=3, steps_per_epoch=1)()
    state = optimizer.init(jnp.zeros(()))
    rates = []
    for _ in range(3):
        updates, state = optimizer.update(-jnp.ones(()), state, jnp.zeros(()))
        rates.append(float(updates))
    np.testing.assert_allclose(rates, [0.1, 0.1 * 0.5**2, 0.1 * 0.5**4], rtol=1e-5)

"""Optax optimizers and learning-rate schedules from the `optimizer` and `schedule` configs.

Every key of an optimizer config other than `name`, `lr` and `clip_norm` is passed to the optax
constructor as it is, so `configs/optimizer/*.yaml` speak optax's own argument names. A model may
have an optimizer config of its own (the log-linear M-step's `model.m_step_optimizer`), read the
same way.
"""


import optax
from omegaconf import OmegaConf

from dgm_cli.errors import DgmError, choice, non_negative_float, positive_float

OPTIMIZERS = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "sgd": optax.sgd,
    "rmsprop": optax.rmsprop,
}


def _constant(lr, config, total_steps, steps_per_epoch):
    return optax.constant_schedule(lr)


def _cosine(lr, config, total_steps, steps_per_epoch):
    warmup_epochs = non_negative_float(config.warmup_epochs, "schedule.warmup_epochs")
    final_fraction = config.final_fraction
    if isinstance(final_fraction, bool) or not isinstance(final_fraction, (int, float)) or not 0 <= final_fraction <= 1:
        # Below 0 the learning rate would turn negative and the optimizer ascend the loss.
        raise DgmError(f"schedule.final_fraction must lie in [0, 1] (the final learning rate as a fraction "
                       f"of optimizer.lr), got {final_fraction!r}")
    warmup_steps = int(warmup_epochs * steps_per_epoch)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup_steps else lr,
        peak_value=lr,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=lr * final_fraction,
    )


def _exponential(lr, config, total_steps, steps_per_epoch):
    decay_rate = positive_float(config.decay_rate, "schedule.decay_rate")
    decay_epochs = positive_float(config.decay_epochs, "schedule.decay_epochs")
    # Not rounded to whole steps: optax would silently hold the rate constant for 0 steps per decay.
    return optax.exponential_decay(lr, transition_steps=decay_epochs * steps_per_epoch, decay_rate=decay_rate)


SCHEDULES = {"constant": _constant, "cosine": _cosine, "exponential": _exponential}
# Those shaped by the run's length: a run taken on to more epochs would not follow its schedule.
SHAPED_BY_LENGTH = {"cosine"}


def _builder(optimizer_config, where: str):
    """(lr, build): the config's learning rate, checked, and `build(learning_rate)` -> its optax
    optimizer at `learning_rate`, a number or a schedule. `where` names the config in errors."""
    constructor = choice(optimizer_config.name, OPTIMIZERS, where)
    options = OmegaConf.to_container(optimizer_config)
    lr = positive_float(options.pop("lr", None), f"{where}.lr")
    options.pop("name")
    clip_norm = options.pop("clip_norm", None)
    clip = None if clip_norm is None else positive_float(clip_norm, f"{where}.clip_norm")

    def build(learning_rate) -> optax.GradientTransformation:
        try:
            optimizer = constructor(learning_rate=learning_rate, **options)
        except TypeError as error:
            raise DgmError(f"{where} {optimizer_config.name}: {error}") from None
        return optimizer if clip is None else optax.chain(optax.clip_by_global_norm(clip), optimizer)

    return lr, build


def optimizer_factory(optimizer_config, schedule_config, epochs: int, steps_per_epoch: int):
    """`make_optimizer(lr=None)`: the configured optimizer and schedule, at `lr` if given."""
    default_lr, build = _builder(optimizer_config, "optimizer")
    make_schedule = choice(schedule_config.name, SCHEDULES, "schedule")

    def make_optimizer(lr: float | None = None) -> optax.GradientTransformation:
        lr = default_lr if lr is None else lr
        return build(make_schedule(lr, schedule_config, epochs * steps_per_epoch, steps_per_epoch))

    make_optimizer()  # fail on a bad setting now, not inside the first jitted step
    make_optimizer.steps_per_epoch = steps_per_epoch  # for what a model schedules itself (KL warm-up)
    return make_optimizer


def constant_optimizer(optimizer_config, where: str) -> optax.GradientTransformation:
    """The optimizer of `optimizer_config` at its own constant `lr`, for an inner loop that the
    run's schedule, which counts the training steps of the run, knows nothing of (an M-step)."""
    lr, build = _builder(optimizer_config, where)
    return build(lr)


def apply_gradients(optimizer: optax.GradientTransformation, grads, params, opt_state):
    """One optimizer step: -> (new params, new optimizer state)."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

"""Optax optimizers and learning-rate schedules from the `optimizer` and `schedule` configs.

Every key of an optimizer config other than `name`, `lr` and `clip_norm` is passed to the optax
constructor as it is, so `configs/optimizer/*.yaml` speak optax's own argument names.
"""

import optax
from omegaconf import OmegaConf

from dgm_cli.errors import DgmError, choice, positive_float

OPTIMIZERS = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "sgd": optax.sgd,
    "rmsprop": optax.rmsprop,
}


def _constant(lr, config, total_steps, steps_per_epoch):
    return optax.constant_schedule(lr)


def _cosine(lr, config, total_steps, steps_per_epoch):
    warmup_steps = int(config.warmup_epochs * steps_per_epoch)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup_steps else lr,
        peak_value=lr,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=lr * config.final_fraction,
    )


def _exponential(lr, config, total_steps, steps_per_epoch):
    return optax.exponential_decay(
        lr, transition_steps=int(config.decay_epochs * steps_per_epoch), decay_rate=config.decay_rate
    )


SCHEDULES = {"constant": _constant, "cosine": _cosine, "exponential": _exponential}


def optimizer_factory(optimizer_config, schedule_config, epochs: int, steps_per_epoch: int):
    """`make_optimizer(lr=None)`: the configured optimizer and schedule, at `lr` if given."""
    constructor = choice(optimizer_config.name, OPTIMIZERS, "optimizer")
    make_schedule = choice(schedule_config.name, SCHEDULES, "schedule")
    options = OmegaConf.to_container(optimizer_config)
    default_lr = positive_float(options.pop("lr"), "optimizer.lr")
    options.pop("name")
    clip_norm = options.pop("clip_norm", None)

    def make_optimizer(lr: float | None = None) -> optax.GradientTransformation:
        lr = default_lr if lr is None else lr
        schedule = make_schedule(lr, schedule_config, epochs * steps_per_epoch, steps_per_epoch)
        try:
            optimizer = constructor(learning_rate=schedule, **options)
        except TypeError as error:
            raise DgmError(f"optimizer {optimizer_config.name}: {error}") from None
        if clip_norm is None:
            return optimizer
        clip = positive_float(clip_norm, "optimizer.clip_norm")
        return optax.chain(optax.clip_by_global_norm(clip), optimizer)

    make_optimizer()  # fail on a bad setting now, not inside the first jitted step
    return make_optimizer


def apply_gradients(optimizer: optax.GradientTransformation, grads, params, opt_state):
    """One optimizer step: -> (new params, new optimizer state)."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

"""The model families, each behind the same small contract.

The runner knows a model only through this contract, and a model knows nothing about files:

    model = build(config.model, spec, make_optimizer)    # spec: dgm_cli.data.Spec of the data
    state = model.init(key)                              # a pytree: parameters, optimizer states
    state, metrics = model.train_step(state, batch, key) # batch: {"x": [B, D] in {0, 1},
                                                         #   "labels": [B] if the data has them};
                                                         #   metrics: scalars, "loss" among them
    model.evaluate(state, batch, key)                    # per-example metrics, each [B]
    model.log_likelihood(state, x, key, num_samples)     # [B] log p(x) estimate, in nats
    model.log_weights(state, x, key, num_samples)        # [K, B] log p(x, h_k) − log q(h_k | x),
                                                         #   h_k ~ q(h | x): not for exact families
    model.sample(state, key, n)                          # [n, D] samples or their pixel
                                                         #   probabilities, in [0, 1]
    model.reconstruct(state, x, key)                     # [B, D] pixel probabilities
    model.extra_pictures(state)                          # {name: [N, D]} the family's own grids

and two class attributes: `exact_likelihood` (log_likelihood needs no samples) and
`selection_metric` (the key of `evaluate` whose validation mean, lower is better, picks the
best epoch). `make_optimizer(lr=None)` builds the configured optax optimizer, at another
learning rate if given; `make_optimizer.steps_per_epoch` is the run's training steps per epoch.
Every method is pure and jit-compatible.

A family whose inference net's gradient is estimated (sbn, wakesleep) also has
`recognition_gradient(state, batch, key)`: the gradient pytree that one training step would give
q's optimizer, which `trainer.diagnostics_every` draws many times to measure its variance. A
family of continuous latents (vae) has `active_units(state, x, key)`: [layers] the active units
of each stochastic layer over the examples x, which the same diagnostics log and the summary keeps.
"""

from dgm_cli.errors import choice
from dgm_cli.models.loglinear import LogLinear
from dgm_cli.models.sbn import SBN
from dgm_cli.models.vae import VAE
from dgm_cli.models.wakesleep import WakeSleep

MODELS = {"vae": VAE, "wakesleep": WakeSleep, "sbn": SBN, "loglinear": LogLinear}


def build(config, spec, make_optimizer):
    return choice(config.name, MODELS, "model")(config, spec, make_optimizer)

"""The model families, each behind the same small contract.

The runner knows a model only through this contract, and a model knows nothing about files:

    model = build(config.model, data_dim, make_optimizer)
    state = model.init(key)                              # a pytree: parameters, optimizer states
    state, metrics = model.train_step(state, x, key)     # x: [B, D] in {0, 1}; metrics: scalars,
                                                         #   "loss" among them
    model.evaluate(state, x, key)                        # per-example metrics, each [B]
    model.log_likelihood(state, x, key, num_samples)     # [B] log p(x) estimate, in nats
    model.sample(state, key, n)                          # [n, D] pixel probabilities
    model.reconstruct(state, x, key)                     # [B, D] pixel probabilities

and two class attributes: `exact_likelihood` (log_likelihood needs no samples) and
`selection_metric` (the key of `evaluate` whose validation mean, lower is better, picks the
best epoch). `make_optimizer(lr=None)` builds the configured optax optimizer, at another
learning rate if given. Every method is pure and jit-compatible.
"""

from dgm_cli.errors import choice
from dgm_cli.models.vae import VAE

MODELS = {"vae": VAE}


def build(config, data_dim: int, make_optimizer):
    return choice(config.name, MODELS, "model")(config, data_dim, make_optimizer)

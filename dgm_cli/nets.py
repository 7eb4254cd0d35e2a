"""Neural-network building blocks shared by the model families and the estimators (Flax NNX).

NNX modules are JAX pytrees, so a model's parameters travel through `jax.jit`, `lax.scan`,
`jax.grad`, optax and Orbax as they are, with no split/merge at the call sites.
"""

from collections.abc import Sequence

import jax
from flax import nnx

from dgm_cli.errors import choice

ACTIVATIONS = {
    "relu": nnx.relu,
    "tanh": nnx.tanh,
    "sigmoid": nnx.sigmoid,
    "softplus": nnx.softplus,
    "elu": nnx.elu,
    "gelu": nnx.gelu,
    "silu": nnx.silu,
    "leaky_relu": nnx.leaky_relu,
}


def activation(name: str):
    return choice(name, ACTIVATIONS, "model.activation")


class MLP(nnx.Module):
    """Dense layers `sizes[0] → … → sizes[-1]`, the activation between them, none after the last."""

    def __init__(self, sizes: Sequence[int], activation, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [nnx.Linear(n_in, n_out, rngs=rngs) for n_in, n_out in zip(sizes[:-1], sizes[1:])]
        )
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.after_first(self.layers[0](x))

    def after_first(self, pre: jax.Array) -> jax.Array:
        """The net from the first layer's output (before its activation) on. The first layer is
        affine, so a change of one input moves `pre` by that input's row of its kernel: what lets
        a Gibbs update of one unit recompute only the rest."""
        if len(self.layers) == 1:
            return pre
        x = self.activation(pre)
        for layer in self.layers[1:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)

"""The stochastic units of the sigmoid-belief-net family: binary, or categorical with C values.

A layer of N variables has logits a of width N (Bernoulli) or N·C (categorical, C logits a
variable, its value one-hot); the layer above reads the values as they are. Each draw is the
argmax of its logits plus noise from uniforms u: the logistic noise log(1 − u) − log u for a
binary unit (h = 1[a + noise > 0] = 1[u < σ(a)]), Gumbel noise −log(−log u) for each category.
The estimators relax the draws through the same noise (`relax`), and REBAR and RELAX draw it
again given the draw (`tied_noise`). Below both the models and the estimators.
"""

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from dgm_cli import objectives
from dgm_cli.bernoulli import bernoulli, fires

RESOLUTION = 24  # bits of a binary unit's uniform, as every draw from q takes (`dgm_cli.bernoulli`)
sg = jax.lax.stop_gradient


def cell_centres(bits, dtype):
    """The uniforms u behind 24-bit `bits`, the centres of their cells. The top cell's, 1 − 2^-25,
    rounds to 1 in float32, where the noise is −inf (and a relaxation's temperature gradient NaN:
    REBAR on MNIST met it within 100 steps): it takes the float below 1."""
    return jnp.minimum((bits.astype(dtype) + 0.5) / 2**RESOLUTION, 1.0 - 2.0**-RESOLUTION)


@dataclass(frozen=True)  # compared by value: the units are static parts of the networks' pytrees
class Bernoulli:
    """Binary units, drawn from 24-bit uniforms as `dgm_cli.bernoulli` draws them."""

    def width(self, variables: int) -> int:
        return variables

    def log_prob(self, h, logits):
        """Σ log Bern(h | σ(a)) over the layer; h may be relaxed (between 0 and 1)."""
        return objectives.bernoulli_log_likelihood(h, logits)

    def sample(self, key, logits, shape):
        return bernoulli(key, jax.nn.sigmoid(logits), shape).astype(logits.dtype)

    def draw(self, key, logits, shape, flipped=False):
        """h and the uniforms behind it, the centres of their 2^-24 cells as `fires` compares them;
        `flipped`: from 1 − u, the antithetic twin."""
        bits = jax.random.bits(key, shape, jnp.uint32) >> (32 - RESOLUTION)
        bits = 2**RESOLUTION - 1 - bits if flipped else bits
        h = fires(bits, jax.nn.sigmoid(logits), RESOLUTION).astype(logits.dtype)
        return h, cell_centres(bits, logits.dtype)

    def noise(self, u):
        return jnp.log1p(-u) - jnp.log(u)  # logistic: h = 1[a + noise > 0]

    def relax(self, z, temperature):
        return jax.nn.sigmoid(z / temperature)

    def logits_of(self, p):
        return jnp.log(p) - jnp.log1p(-p)

    def tied_noise(self, u, h, logits):
        """The noise again given the draw h, tied to u: ũ = v p if h else p + v (1 − p), p = σ(a),
        v = sg(u's place in its interval); the value of `noise(u)`, a function of a. Both log ũ and
        log(1 − ũ) are sums of positive terms in log σ(±a) (the place's complement 1 − v counted on
        its own), as ũ itself rounds to 0 or 1, and its gradient cancels, where p nears them."""
        log_p, log_not_p = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
        p, not_p = jnp.exp(log_p), jnp.exp(log_not_p)
        beyond = jnp.where(logits > 0, not_p - (1.0 - u), u - p)  # u − p, from the smaller of p, 1 − p

        def log_place(numerator, denominator):  # log sg(clip(n / d)), zero-safe
            return jnp.log(sg(jnp.clip(numerator / denominator, 1e-30, 1.0)))

        # fired: ũ = v p and 1 − ũ = (1 − p) + (1 − v) p, with v = u / p
        fired = (jnp.logaddexp(log_not_p, log_place(-beyond, p) + log_p)
                 - log_place(u, p) - log_p)
        # silent: ũ = p + v (1 − p) and 1 − ũ = (1 − v)(1 − p), with v = (u − p) / (1 − p)
        silent = (log_place(1.0 - u, not_p) + log_not_p
                  - jnp.logaddexp(log_p, log_place(beyond, not_p) + log_not_p))
        return jnp.where(h > 0, fired, silent)

    def concrete_draw(self, key, logits, temperature, shape):
        """The binary Concrete's pre-sigmoid s = (a + log u − log(1 − u)) / τ, reparameterised in a."""
        u = jax.random.uniform(key, shape, minval=1e-7, maxval=1.0 - 1e-7)
        return (logits + jnp.log(u) - jnp.log1p(-u)) / temperature

    def concrete_log_density(self, s, logits, temperature):
        """Σ log density of s (Maddison et al. 2017, Appendix C): log τ + a − τs − 2 log(1 + exp(a − τs))."""
        t = logits - temperature * s
        return jnp.sum(math.log(temperature) + t - 2.0 * objectives.softplus(t), axis=-1)

    def concrete_value(self, s):
        return jax.nn.sigmoid(s)

    def values(self):
        """The values one variable takes, [V, its width]: 0 and 1 (what a Gibbs update chooses among)."""
        return jnp.asarray([[0.0], [1.0]])

    def value_log_probs(self, logits):
        """log p of each value of each variable, [..., N, V]: log σ(−a), log σ(a)."""
        return jnp.stack([jax.nn.log_sigmoid(-logits), jax.nn.log_sigmoid(logits)], -1)


@dataclass(frozen=True)
class Categorical:
    """Variables of C categories each, one-hot; drawn by Gumbel-max from float32 uniforms."""

    categories: int

    def width(self, variables: int) -> int:
        return variables * self.categories

    def _split(self, x):  # [..., N·C] -> [..., N, C]
        return x.reshape(*x.shape[:-1], -1, self.categories)

    def _join(self, x):
        return x.reshape(*x.shape[:-2], -1)

    def log_prob(self, h, logits):
        """Σ_n Σ_c h_nc log softmax(a_n)_c; h may be relaxed (on the simplex)."""
        return jnp.sum(h * self._join(jax.nn.log_softmax(self._split(logits))), axis=-1)

    def sample(self, key, logits, shape):
        return self.draw(key, logits, shape)[0]

    def draw(self, key, logits, shape, flipped=False):  # antithetic twins are binary only: never flipped
        u = jax.random.uniform(key, shape, logits.dtype, minval=jnp.finfo(logits.dtype).tiny, maxval=1.0)
        z = self._split(jnp.broadcast_to(logits, shape) + self.noise(u))
        return self._join(jax.nn.one_hot(jnp.argmax(z, -1), self.categories, dtype=logits.dtype)), u

    def noise(self, u):
        return -jnp.log(-jnp.log(u))  # Gumbel: h = one-hot argmax(a + noise)

    def relax(self, z, temperature):
        return self._join(jax.nn.softmax(self._split(z) / temperature))

    def logits_of(self, p):
        return jnp.log(p)  # up to a constant per variable, which the softmax ignores

    def tied_noise(self, u, h, logits):
        """The Gumbels again given the argmax k (Tucker et al. 2017, Appendix): with θ = log softmax(a)
        and z = θ + noise(u), the top z_k stays (its law given k does not depend on θ) and below it
        z_i = −log(E_i e^{−θ_i} + e^{−z_k}), E_i = sg((e^{−z_i} − e^{−z_k}) e^{θ_i}) the exponential
        that gives back z_i. In logs, as e^{−z} and −log v overflow or round where z is far from 0.
        -> z − θ: the value of `noise(u)`, a function of a."""
        theta = jax.nn.log_softmax(self._split(logits))
        hot = self._split(h) > 0
        z = sg(theta + self._split(self.noise(u)))
        top = jnp.max(jnp.where(hot, z, -jnp.inf), -1, keepdims=True)
        gap = jnp.minimum(z - top, 0.0)  # ≤ 0 below the top; the top's own is unused
        log_e = sg(theta) - z + jnp.log(-jnp.expm1(jnp.where(hot, -1.0, gap)))
        below = -jnp.logaddexp(log_e - theta, -top)
        return self._join(jnp.where(hot, top, below) - theta)

    def concrete_draw(self, key, logits, temperature, shape):
        """The ExpConcrete's s = log softmax((a + Gumbel noise) / τ), reparameterised in a."""
        u = jax.random.uniform(key, shape, minval=1e-7, maxval=1.0 - 1e-7)
        return self._join(jax.nn.log_softmax(self._split(logits + self.noise(u)) / temperature))

    def concrete_log_density(self, s, logits, temperature):
        """Σ_n log density of the ExpConcrete s_n (Maddison et al. 2017, Appendix B):
        log (C − 1)! + (C − 1) log τ + Σ_c (a_c − τ s_c) − C logsumexp_c (a_c − τ s_c)."""
        c = self.categories
        t = self._split(logits) - temperature * self._split(s)
        per_variable = (math.lgamma(c) + (c - 1) * math.log(temperature) + jnp.sum(t, -1)
                        - c * jax.nn.logsumexp(t, -1))
        return jnp.sum(per_variable, -1)

    def concrete_value(self, s):
        return jnp.exp(s)

    def values(self):
        """The values one variable takes, [C, C]: the one-hot vectors."""
        return jnp.eye(self.categories)

    def value_log_probs(self, logits):
        """log p of each value of each variable, [..., N, C]."""
        return jax.nn.log_softmax(self._split(logits))

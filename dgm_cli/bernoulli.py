"""Bernoulli draws from random bits, below both the models and the estimators that use them.

Binary units are drawn from random bits by `fires`, p rounded to the nearest multiple of their
resolution. Draws from q put log q(h|x) into importance weights (in training with K > 1, in
validation, in the test log-likelihood), so they take 24 bits, the most a float32 comparison holds
exactly; wake-sleep's dreams are only targets of log q(h̃|x̃), so they take 16. CPU time of an
epoch at batch 128 on 2 cores: 24-bit wake draws cost 1% with layers [200], K = 1 (1.30× the VAE's
epoch), nothing measurable with [200, 200], K = 5; 24-bit dreams would cost another 6%.
"""

import math

import jax
import jax.numpy as jnp


def fires(bits, probabilities, resolution: int):
    """Bern(p) from `bits` uniform on {0, …, 2^n − 1}, n = `resolution`: fires with probability
    round(p·2^n)/2^n, as if u stood at the midpoint of its cell. The plain `u < p·2^n` rounds p up:
    a unit with p far below 2^-n fired at 2^-n while log q(h|x) charged it log p, and that one draw
    could outweigh the other K − 1 importance weights. Rounded to nearest, no p is overstated by
    more than a factor of 2 (just above 2^-(n+1)), and a p below 2^-(n+1) never fires: that leaves
    out only samples that q would draw less than once in 2^(n+1)."""
    return bits < jnp.round(probabilities * 2.0**resolution)  # exact in float32 for n ≤ 24


def bernoulli_16bit(key, probabilities, shape):
    """Bern(p) to 2^-16 from 16 random bits each, two to a 32-bit word: the sleep phase's dreams,
    most of a classic step's draws, on half the random bits of `bernoulli`."""
    size = math.prod(shape)
    words = jax.random.bits(key, ((size + 1) // 2,), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:size].reshape(shape)
    return fires(halves, probabilities, 16)


def bernoulli(key, probabilities, shape):
    """Bern(p) to 2^-24 from the top 24 bits of a 32-bit word: the same bits as jax.random.bernoulli,
    which compares p with (word >> 9) / 2^23 and so fires at 2^-23 however small a positive p is."""
    return fires(jax.random.bits(key, shape, jnp.uint32) >> 8, probabilities, 24)

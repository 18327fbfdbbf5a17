"""Token sampling math: temperature, top-k, top-p, and the log-probs of the choice.

All sampling parameters are traced scalars (not static), so a new temperature
or top-p does not recompile the decode loop. Conventions (as in vLLM / HF):
- temperature == 0 is greedy; the reported log-prob is then the log-softmax of
  the unscaled logits (the delta distribution would always report 0);
- top_k == 0 and top_p == 1 disable the corresponding truncation;
- ties at the truncation threshold are kept (a threshold on logit values, as
  HF's TopKLogitsWarper), which avoids a scatter back from sorted order.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def truncated_logprobs(logits: jax.Array, temperature: jax.Array | float,
                       top_p: jax.Array | float = 1.0, top_k: jax.Array | int = 0) -> jax.Array:
    """Log-probs [..., V] of softmax(logits / T) restricted to the top-k / top-p set.

    Excluded tokens get -inf. With temperature 0 the unscaled distribution is
    truncated the same way (only its argmax matters for greedy decoding).
    """
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    t = jnp.asarray(temperature, jnp.float32)
    scaled = logits / jnp.where(t > 0, t, 1.0)
    # One descending sort serves both truncations.
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.asarray(top_k, jnp.int32)
    k = jnp.where((k <= 0) | (k > v), v, k)
    rank = jnp.arange(v)
    sorted_k = jnp.where(rank < k, sorted_desc, NEG_INF)
    # top-p on the top-k-renormalised distribution (the order HF and vLLM apply them in):
    # keep the smallest prefix whose mass reaches top_p (a token is kept when
    # the mass strictly before it is < top_p; the first token always is).
    probs = jax.nn.softmax(sorted_k, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    p = jnp.asarray(top_p, jnp.float32)
    keep_sorted = (rank < k) & ((mass_before < p) | (rank == 0) | (p >= 1.0))
    n_keep = jnp.sum(keep_sorted, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
    masked = jnp.where(scaled >= threshold, scaled, NEG_INF)
    return jax.nn.log_softmax(masked, axis=-1)


def sample_tokens(key: jax.Array, logits: jax.Array, temperature: jax.Array | float,
                  top_p: jax.Array | float = 1.0,
                  top_k: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """Sample one token per row of `logits` [B, V]; returns (tokens [B] int32, logprobs [B] f32).

    The log-prob is that of the chosen token under the temperature-scaled,
    truncated distribution (unscaled log-softmax when greedy, see module doc).
    """
    lp = truncated_logprobs(logits, temperature, top_p, top_k)
    greedy = jnp.asarray(temperature, jnp.float32) <= 0
    sampled = jax.random.categorical(key, lp, axis=-1)
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)
    full = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.where(greedy, full, lp)
    logprobs = jnp.take_along_axis(chosen, tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs


def is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    """Boolean [B]: the token is one of the EOS ids."""
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))

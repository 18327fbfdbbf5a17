"""Generalized JSD against a top-k teacher (k log-probs + ids per token at temperature T).

"tail" (default) collapses both distributions onto the k ids plus one
rest-of-vocabulary bucket and takes the exact JSD of those k+1 outcomes: a lower
bound of the dense JSD (data processing), equal to it when k = V. "renormalize"
is verl's: both restricted to the k ids and renormalised.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gold_jax.losses import validation as val
from gold_jax.losses.core import (NEG_FLOOR, compute_dtype, masked_normalizer, reduce_tokens, scaled_logits,
                                  topk_token_terms, vocab_valid)


def topk_mask(ids: jax.Array, n_cols: int, offset=0) -> jax.Array:
    """Boolean [..., n_cols]: True at columns offset + j that appear in ids [..., k].

    Ids outside [offset, offset + n_cols) are dropped, so on a vocab shard only
    the ids that the shard owns are marked (a scatter, no [..., V, k] one-hot).
    """
    lead = ids.shape[:-1]
    flat = ids.reshape(-1, ids.shape[-1]) - offset
    flat = jnp.where((flat >= 0) & (flat < n_cols), flat, n_cols)  # n_cols = out of bounds: dropped
    rows = jnp.arange(flat.shape[0])[:, None]
    out = jnp.zeros((flat.shape[0], n_cols), bool).at[rows, flat].set(True, mode="drop")
    return out.reshape(*lead, n_cols)


def topk_per_token(student_logits: jax.Array, teacher_logprobs: jax.Array, teacher_ids: jax.Array,
                   teacher_logmass: jax.Array | None, *, beta: float, temperature: float, mode: str,
                   vocab_size: int) -> jax.Array:
    """Unreduced per-token top-k JSD [...]; ids are clamped into [0, vocab_size)."""
    dt = compute_dtype(student_logits, teacher_logprobs)
    s = scaled_logits(student_logits, temperature, dt)
    lt = jnp.maximum(teacher_logprobs.astype(dt), NEG_FLOOR)
    ids = jnp.clip(teacher_ids.astype(jnp.int32), 0, vocab_size - 1)
    s_k = jnp.take_along_axis(s, ids, axis=-1)
    if mode == "renormalize":
        return topk_token_terms(s_k, None, None, lt, None, beta, mode)
    valid = vocab_valid(s.shape[-1], vocab_size)
    real = None if valid is None else jnp.broadcast_to(valid, s.shape)
    rest = ~topk_mask(ids, s.shape[-1])
    if real is not None:
        rest = rest & real
    m, log_sum, _ = masked_normalizer(s, real)
    tail_m, tail_log_sum, has_tail = masked_normalizer(s, rest)
    logq_k = (s_k - m[..., None]) - log_sum[..., None]
    logq_tail = (tail_m - m) + (tail_log_sum - log_sum)
    logmass = None if teacher_logmass is None else teacher_logmass.astype(dt)
    return topk_token_terms(logq_k, logq_tail, has_tail, lt, logmass, beta, mode)


def topk_jsd(student_logits: jax.Array, teacher_logprobs: jax.Array, teacher_ids: jax.Array,
             mask: jax.Array, *, beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean",
             mode: str = "tail", teacher_logmass: jax.Array | None = None,
             vocab_size: int | None = None) -> jax.Array:
    """Generalized JSD of student logits [..., V] against a top-k teacher.

    teacher_logprobs [..., k] are log-probs already at temperature T (the
    teacher server applies T); the student logits are divided by T here.
    teacher_logmass [...] is the exact log of the top-k set's mass (default:
    logsumexp(teacher_logprobs)). Ids must be distinct per token; out-of-range
    ids raise on concrete input and are clamped under jit.
    """
    beta, temperature = val.check_beta(beta), val.check_temperature(temperature)
    val.check_reduction(reduction)
    mode = val.check_mode(mode)
    if student_logits.ndim < 1:
        raise ValueError("student_logits must have a vocabulary axis [..., V]")
    vocab_size = val.check_vocab_size(vocab_size, student_logits.shape[-1])
    val.check_topk(student_logits.shape, teacher_logprobs, teacher_ids, mask, teacher_logmass, vocab_size)
    per_token = topk_per_token(student_logits, teacher_logprobs, teacher_ids, teacher_logmass, beta=beta,
                               temperature=temperature, mode=mode, vocab_size=vocab_size)
    return reduce_tokens(per_token, mask, reduction, vocab_size)

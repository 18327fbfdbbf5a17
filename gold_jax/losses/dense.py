"""Generalized JSD between full student and teacher logits (the reference form)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gold_jax.losses import validation as val
from gold_jax.losses.core import compute_dtype, jsd_terms, masked_normalizer, reduce_tokens

# -inf logits (masked tokens) become this finite floor so that 0 * log 0 terms stay 0, not NaN.
NEG_FLOOR = -1e30


def scaled_logits(logits: jax.Array, temperature: float, dtype) -> jax.Array:
    return jnp.maximum(logits.astype(dtype), NEG_FLOOR) / temperature


def vocab_valid(n_cols: int, vocab_size: int, offset=0) -> jax.Array | None:
    """Boolean [n_cols] mask of real (non-padding) vocabulary columns, None if all are real."""
    if offset == 0 and n_cols == vocab_size:
        return None
    return (offset + jnp.arange(n_cols)) < vocab_size


def log_softmax(x: jax.Array, keep: jax.Array | None) -> jax.Array:
    m, log_sum, _ = masked_normalizer(x, keep)
    return (x - m[..., None]) - log_sum[..., None]


def dense_per_token(student_logits: jax.Array, teacher_logits: jax.Array, *, beta: float,
                    temperature: float, vocab_size: int) -> jax.Array:
    """Unreduced per-token JSD [...] from logits [..., V]; columns >= vocab_size are ignored."""
    dt = compute_dtype(student_logits, teacher_logits)
    s = scaled_logits(student_logits, temperature, dt)
    t = scaled_logits(teacher_logits, temperature, dt)
    valid = vocab_valid(s.shape[-1], vocab_size)
    keep = None if valid is None else jnp.broadcast_to(valid, s.shape)
    logq, logp = log_softmax(s, keep), log_softmax(t, keep)
    if keep is not None:  # padded columns: finite placeholders, masked out of the sum
        logq, logp = jnp.where(keep, logq, 0.0), jnp.where(keep, logp, 0.0)
    return jnp.sum(jsd_terms(logp, logq, beta, valid=keep), axis=-1)


def generalized_jsd(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array, *,
                    beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean",
                    vocab_size: int | None = None) -> jax.Array:
    """beta*KL(P||M) + (1-beta)*KL(Q||M), P = softmax(teacher/T), Q = softmax(student/T).

    logits [..., V], mask [...] (1 = token enters the loss). beta == 0 is exactly
    KL(P||Q), beta == 1 exactly KL(Q||P). `vocab_size` < V marks the last columns
    as embedding padding (Qwen's 152064 rows for 151936 tokens). reduction="sum"
    is what gradient accumulation wants: divide by the kept-token count of the
    whole accumulated batch (see `loss_sum_and_count`).
    """
    beta, temperature = val.check_beta(beta), val.check_temperature(temperature)
    val.check_reduction(reduction)
    val.check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
    if student_logits.ndim < 1:
        raise ValueError("student_logits must have a vocabulary axis [..., V]")
    val.check_mask(mask, student_logits.shape[:-1])
    vocab_size = val.check_vocab_size(vocab_size, student_logits.shape[-1])
    per_token = dense_per_token(student_logits, teacher_logits, beta=beta, temperature=temperature,
                                vocab_size=vocab_size)
    return reduce_tokens(per_token, mask, reduction, vocab_size)

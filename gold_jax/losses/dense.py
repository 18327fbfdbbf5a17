"""Generalized JSD between full student and teacher logits (closed-form gradient: dense_vjp)."""
from __future__ import annotations

import jax

from gold_jax.losses import validation as val
from gold_jax.losses.core import reduce_tokens
from gold_jax.losses.dense_vjp import dense_rows


def dense_per_token(student_logits: jax.Array, teacher_logits: jax.Array, *, beta: float,
                    temperature: float, vocab_size: int) -> jax.Array:
    """Unreduced per-token JSD [...] from logits [..., V]; columns >= vocab_size are ignored."""
    lead, n_cols = student_logits.shape[:-1], student_logits.shape[-1]
    rows = dense_rows(student_logits.reshape(-1, n_cols), teacher_logits.reshape(-1, n_cols),
                      beta, temperature, vocab_size)
    return rows.reshape(lead)


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

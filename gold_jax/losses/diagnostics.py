"""Top-k coverage diagnostics, computed from what a loss already holds (no extra pass over the logits).

Per completion token:
- teacher/topk_mass: the teacher's probability mass inside its top-k set
  (exp of the exact log-mass the server returns; 1 - the tail bucket);
- student/mass_on_teacher_topk: the student's mass on the teacher's top-k ids,
  Σ_j exp(logq_k[j]), from the log-probs at the teacher ids that the top-k and
  fused losses compute anyway;
- gold/topk_overlap: |top-k(student) ∩ top-k(teacher)| / k, the student's top-k
  taken with lax.top_k on the logits (or one chunk of them) already in hand;
- teacher/sampled_token_logprob: log p(y_t) of the sampled token.

Each is a masked mean over completion tokens. `diagnostic_sums` returns
(sum, count) pairs so that micro-batches and on/off-policy rows can be summed
before the one division.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from gold_jax.losses.core import NEG_FLOOR, compute_dtype, masked_normalizer, vocab_valid

NAMES = ("teacher/topk_mass", "student/mass_on_teacher_topk", "gold/topk_overlap", "teacher/sampled_token_logprob")


class TopkTeacher(NamedTuple):
    logprobs: jax.Array               # [..., k] at temperature T
    ids: jax.Array                    # [..., k] int
    logmass: jax.Array | None = None  # [...] exact log of the top-k mass


def teacher_topk_mass(teacher_logprobs: jax.Array, teacher_logmass: jax.Array | None = None) -> jax.Array:
    """exp(teacher_logmass), or Σ exp(top-k log-probs) when the server sent no exact log-mass."""
    if teacher_logmass is not None:
        return jnp.exp(jnp.minimum(teacher_logmass.astype(compute_dtype(teacher_logmass)), 0.0))
    lt = teacher_logprobs.astype(compute_dtype(teacher_logprobs))
    return jnp.sum(jnp.exp(jnp.maximum(lt, NEG_FLOOR)), axis=-1)


def mass_on_ids(logq_k: jax.Array) -> jax.Array:
    """Σ_j exp(logq_k[..., j]): the student's mass on the teacher's ids from its log-probs there."""
    return jnp.sum(jnp.exp(logq_k), axis=-1)


def topk_overlap(scores: jax.Array, teacher_ids: jax.Array, vocab_size: int | None = None, offset=0) -> jax.Array:
    """|top-k(scores) ∩ teacher_ids| / k per row, k = teacher_ids.shape[-1]; padding columns never count.

    scores [..., V] is anything monotone in the student's log-probs (raw or
    scaled logits). [k, k] comparisons per row: no [..., V] one-hot.
    """
    k = teacher_ids.shape[-1]
    n_cols = scores.shape[-1]
    valid = vocab_valid(n_cols, n_cols if vocab_size is None else vocab_size)
    if valid is not None:
        scores = jnp.where(valid, scores, -jnp.inf)
    _, top = lax.top_k(lax.stop_gradient(scores), min(k, n_cols))
    hit = jnp.any((top + offset)[..., :, None] == teacher_ids.astype(top.dtype)[..., None, :], axis=-1)
    return jnp.sum(hit, axis=-1).astype(compute_dtype(scores)) / k


def student_stats(s: jax.Array, m: jax.Array, log_sum: jax.Array, teacher_ids: jax.Array,
                  vocab_size: int) -> jax.Array:
    """[..., 2]: (student mass on the teacher's ids, top-k overlap) from a loss's own quantities.

    s [..., V]: the scaled logits; m, log_sum [...]: their normaliser
    (logsumexp over the real columns = m + log_sum), as core.masked_normalizer
    gives them. No gradient flows through the result.
    """
    s, m, log_sum = (lax.stop_gradient(x) for x in (s, m, log_sum))
    ids = jnp.clip(teacher_ids.astype(jnp.int32), 0, vocab_size - 1)
    logq_k = (jnp.take_along_axis(s, ids, axis=-1) - m[..., None]) - log_sum[..., None]
    return jnp.stack([mass_on_ids(logq_k), topk_overlap(s, teacher_ids, vocab_size)], axis=-1)


def assemble(student: jax.Array, teacher: TopkTeacher,
             teacher_token_logprob: jax.Array | None = None) -> dict[str, jax.Array]:
    """Per-token diagnostics dict from `student_stats` [..., 2] and the teacher's own numbers."""
    out = {NAMES[0]: teacher_topk_mass(teacher.logprobs, teacher.logmass).astype(student.dtype),
           NAMES[1]: student[..., 0], NAMES[2]: student[..., 1]}
    if teacher_token_logprob is not None:
        out[NAMES[3]] = lax.stop_gradient(teacher_token_logprob).astype(student.dtype)
    return out


def token_diagnostics(logits: jax.Array, teacher: TopkTeacher, teacher_token_logprob: jax.Array | None = None, *,
                      temperature: float = 1.0, vocab_size: int | None = None) -> dict[str, jax.Array]:
    """Per-token diagnostics of student logits [..., V] (materialised form, standalone)."""
    dt = compute_dtype(logits)
    s = jnp.maximum(lax.stop_gradient(logits).astype(dt), NEG_FLOOR) / temperature
    vocab_size = s.shape[-1] if vocab_size is None else vocab_size
    valid = vocab_valid(s.shape[-1], vocab_size)
    m, log_sum, _ = masked_normalizer(s, None if valid is None else jnp.broadcast_to(valid, s.shape))
    return assemble(student_stats(s, m, log_sum, teacher.ids, vocab_size), teacher, teacher_token_logprob)


def diagnostic_sums(per_token: dict[str, jax.Array], mask: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{name: (sum over kept tokens, kept tokens)}: add over micro-batches, then divide once."""
    keep = mask.astype(bool)
    out = {}
    for name, v in per_token.items():
        v = lax.stop_gradient(v)
        out[name] = (jnp.sum(jnp.where(keep, v, 0.0)), jnp.sum(keep, dtype=v.dtype))
    return out


def diagnostic_means(sums: dict[str, tuple[jax.Array, jax.Array]]) -> dict[str, jax.Array]:
    """Masked means; 0 where no token was kept."""
    return {name: s / jnp.maximum(c, 1.0) for name, (s, c) in sums.items()}

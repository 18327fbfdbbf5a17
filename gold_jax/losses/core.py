"""Numerical pieces shared by the dense, top-k, vocab-parallel and fused losses.

Everything works in log space in at least float32 (bf16 logits are upcast before
any sum), and every "0 * log 0" is removed with a `where` on a finite operand so
that neither the value nor its gradient can turn into NaN.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# The teacher's top-k log-mass is clamped below 0 before log1mexp: log(1 - e^x)
# has derivative -1/x near 0, so the clamp bounds it by 1e6 and gives the tail
# bucket a mass floor of about 1e-6 (float32 top-k log-probs cannot resolve a
# tail much below that: each exp(lt) carries ~6e-8 relative rounding).
LOGMASS_MAX = -1e-6
# -inf logits (masked tokens) become this finite floor so that 0 * log 0 terms stay 0, not NaN.
NEG_FLOOR = -1e30


def scaled_logits(logits: jax.Array, temperature: float, dtype) -> jax.Array:
    return jnp.maximum(logits.astype(dtype), NEG_FLOOR) / temperature


def vocab_valid(n_cols: int, vocab_size: int, offset=0) -> jax.Array | None:
    """Boolean [n_cols] mask of real (non-padding) vocabulary columns, None if all are real."""
    if offset == 0 and n_cols == vocab_size:
        return None
    return (offset + jnp.arange(n_cols)) < vocab_size


def compute_dtype(*arrays) -> jnp.dtype:
    """float32 for bf16/f16/f32 inputs, float64 when an input is float64 (tests)."""
    dt = jnp.float32
    for a in arrays:
        if a is not None and jnp.issubdtype(a.dtype, jnp.floating):
            dt = jnp.promote_types(dt, a.dtype)
    return dt


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def masked_normalizer(x: jax.Array, keep: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(m, log_sum, any_kept): logsumexp over the last axis restricted to keep is m + log_sum.

    Callers subtract m from x first: (x - m) - log_sum keeps the log-probs exact
    to float32 rounding even for logits of 1e4 (x - lse would not). Where
    nothing is kept m = log_sum = 0 (finite placeholders to be masked out).
    """
    if keep is None:
        m = jax.lax.stop_gradient(jnp.max(x, axis=-1))
        return m, jnp.log(jnp.sum(jnp.exp(x - m[..., None]), axis=-1)), jnp.ones(x.shape[:-1], bool)
    any_kept = jnp.any(keep, axis=-1)
    m = jax.lax.stop_gradient(jnp.max(jnp.where(keep, x, -jnp.inf), axis=-1))
    m = jnp.where(any_kept, m, 0.0)
    # Mask before exp: a dropped entry above m would give exp = inf and, through where, a NaN gradient.
    s = jnp.sum(jnp.exp(jnp.where(keep, x - m[..., None], -jnp.inf)), axis=-1)
    return m, jnp.log(jnp.where(any_kept, s, 1.0)), any_kept


def jsd_terms(logp: jax.Array, logq: jax.Array, beta: float, valid: jax.Array | None = None) -> jax.Array:
    """Elementwise generalized-JSD terms, P = teacher, Q = student, M = beta P + (1-beta) Q.

    beta == 0 is exactly KL(P||Q), beta == 1 exactly KL(Q||P). Entries where
    `valid` is False contribute 0 (their logp/logq must still be finite).
    """
    p, q = jnp.exp(logp), jnp.exp(logq)
    if beta == 0.0:
        t = p * (logp - logq)
    elif beta == 1.0:
        t = q * (logq - logp)
    else:
        logm = jnp.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
        t = beta * p * (logp - logm) + (1.0 - beta) * q * (logq - logm)
    return t if valid is None else jnp.where(valid, t, 0.0)


def log_normalize(x: jax.Array) -> jax.Array:
    """x - logsumexp(x) over the last axis, shifted by the stop-gradient max first.

    For raw logits of 1e4, x - logsumexp(x) loses ~1e-3 to float32 rounding of
    two huge numbers; (x - m) - log_sum subtracts nearly equal values instead.
    """
    m, log_sum, _ = masked_normalizer(x)
    return (x - m[..., None]) - log_sum[..., None]


def teacher_tail_logprob(teacher_logprobs: jax.Array, teacher_logmass: jax.Array | None) -> jax.Array:
    """log(1 - mass of the top-k set), floored at a mass of -expm1(LOGMASS_MAX) ~ 1e-6.

    Without an exact log-mass the tail is 1 - sum(exp(lt)) straight from the
    log-probs (<= 0, no shift needed; 1 - s is exact for s >= 1/2). The
    logsumexp route, m + log(sum exp(lt - m)), cancels to ~2e-7 absolute near
    a mass of 1, i.e. several percent of a 1e-5 tail.
    """
    floor = -math.expm1(LOGMASS_MAX)
    if teacher_logmass is None:
        tail = 1.0 - jnp.sum(jnp.exp(teacher_logprobs), axis=-1)
        return jnp.log(jnp.maximum(tail, floor))
    return log1mexp(jnp.minimum(teacher_logmass.astype(teacher_logprobs.dtype), LOGMASS_MAX))


def topk_token_terms(logq_k: jax.Array, logq_tail: jax.Array | None, has_tail: jax.Array | None,
                     teacher_logprobs: jax.Array, teacher_logmass: jax.Array | None,
                     beta: float, mode: str) -> jax.Array:
    """Per-token JSD over the k teacher ids (+ the rest-of-vocabulary bucket in "tail" mode).

    logq_k [..., k]: student log-probs at the teacher ids ("renormalize" accepts
    any common shift of them, e.g. the scaled logits); logq_tail / has_tail:
    student log-mass of the non-top-k ids and whether there are any (no tail:
    the bucket contributes 0). Unused in "renormalize" mode.
    """
    lt = teacher_logprobs
    if mode == "renormalize":
        return jnp.sum(jsd_terms(log_normalize(lt), log_normalize(logq_k), beta), axis=-1)
    logp_tail = teacher_tail_logprob(lt, teacher_logmass)
    head = jnp.sum(jsd_terms(lt, logq_k, beta), axis=-1)
    tail = jsd_terms(logp_tail, jnp.where(has_tail, logq_tail, 0.0), beta, valid=has_tail)
    return head + tail


def loss_sum_and_count(per_token: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of per-token losses over kept tokens, number of kept tokens).

    For gradient accumulation: sum the first over micro-batches and divide by
    the second summed over the WHOLE accumulated batch (reduction="sum" gives
    the first directly).
    """
    keep = mask.astype(bool)
    return jnp.sum(jnp.where(keep, per_token, 0.0)), jnp.sum(keep, dtype=per_token.dtype)


def reduce_tokens(per_token: jax.Array, mask: jax.Array, reduction: str, vocab_size: int) -> jax.Array:
    """batchmean = sum / kept tokens (0 if none), sum, mean = sum / (kept * vocab), none."""
    if reduction == "none":
        return jnp.where(mask.astype(bool), per_token, 0.0)
    total, count = loss_sum_and_count(per_token, mask)
    if reduction == "sum":
        return total
    denom = jnp.maximum(count, 1.0) * (vocab_size if reduction == "mean" else 1)
    return total / denom

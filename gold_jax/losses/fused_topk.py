"""Closed-form gradient of one chunk of the fused loss against a top-k teacher (tail / renormalize).

Split out of fused.py, which owns the chunk and tile loops; this is the
per-chunk math only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gold_jax.losses.core import NEG_FLOOR, compute_dtype, masked_normalizer, topk_token_terms, vocab_valid
from gold_jax.losses.topk import topk_mask


def topk_chunk_grad(s: jax.Array, lt: jax.Array, ids: jax.Array, lm: jax.Array | None, ct: jax.Array, *,
                    mode: str, beta: float, temperature: float, vocab_size: int) -> tuple:
    """(d(sum ct * loss)/d(logits) [c, V], d/d teacher_logprobs, d/d teacher_logmass) of one chunk, top-k teacher.

    The loss depends on the logits x = s / T only through the k + 1 bucket
    log-probabilities logq_k = x_k - lse(x) and logq_tail = lse_rest(x) - lse(x)
    ("renormalize": through x_k alone). Autodiff of that small [c, k + 1]
    function gives a = dL/dlogq_k and b = dL/dlogq_tail, and the chain rule is
    closed-form: dL/dx_i = a_j [i = id_j] + b [i in rest] q_i / q_tail
    - q_i (sum_j a_j + b), with q = softmax(x). One elementwise pass plus a
    scatter of k values per row, instead of autodiff's [c, V] cotangents.
    """
    dt = compute_dtype(s, lt)
    valid = vocab_valid(s.shape[-1], vocab_size)
    real = None if valid is None else jnp.broadcast_to(valid, s.shape)
    # The row max is subtracted before scaling (as in dense_vjp._softmax): the top logit is then exactly
    # 0 in every fusion, so a saturated softmax gets exactly 0, not a one-ulp leak of d/dx_top.
    s = jnp.maximum(s.astype(dt), NEG_FLOOR)
    s_max = jnp.max(s if real is None else jnp.where(real, s, -jnp.inf), axis=-1, keepdims=True)
    x = (s - s_max) / temperature
    lt = jnp.maximum(lt.astype(dt), NEG_FLOOR)
    ids = jnp.clip(ids.astype(jnp.int32), 0, vocab_size - 1)
    rows = jnp.arange(x.shape[0])[:, None]
    x_k = jnp.take_along_axis(x, ids, axis=-1)
    if mode == "renormalize":
        _, vjp = jax.vjp(lambda x_k_, lt_: topk_token_terms(x_k_, None, None, lt_, None, beta, mode), x_k, lt)
        a, g_lt = vjp(ct.astype(dt))
        d_x = jnp.zeros_like(x).at[rows, ids].add(a)
        return d_x / temperature, g_lt, None
    rest = ~topk_mask(ids, x.shape[-1])
    if real is not None:
        rest = rest & real
    m, log_sum, _ = masked_normalizer(x, real)
    tail_m, tail_log_sum, has_tail = masked_normalizer(x, rest)
    logq_k = (x_k - m[:, None]) - log_sum[:, None]
    logq_tail = (tail_m - m) + (tail_log_sum - log_sum)
    logmass = None if lm is None else lm.astype(dt)
    fn = lambda lq_k, lq_tail, lt_, lm_: topk_token_terms(lq_k, lq_tail, has_tail, lt_, lm_,  # noqa: E731
                                                          beta, mode)
    _, vjp = jax.vjp(fn, logq_k, logq_tail, lt, logmass)
    a, b, g_lt, g_lm = vjp(ct.astype(dt))
    # Regrouped so that nothing cancels when the softmax saturates (q = 1 at one id, the rest 0):
    # rest:  b (q_i / q_tail) (1 - q_tail) - q_i sum_j a_j
    # id_j:  a_j (1 - q_j) - q_j (sum_{i != j} a_i + b)
    b = jnp.where(has_tail, b, 0.0)
    q = jnp.exp((x - m[:, None]) - log_sum[:, None])
    q_in_tail = jnp.exp(x - (tail_m + tail_log_sum)[:, None])  # q_i / q_tail: <= 1 on the rest
    d_x = jnp.where(rest, (b * -jnp.expm1(logq_tail))[:, None] * q_in_tail - q * jnp.sum(a, axis=-1)[:, None], 0.0)
    k = a.shape[-1]
    others = jnp.sum(jnp.where(jnp.eye(k, dtype=bool), 0.0, a[:, None, :]), axis=-1) + b[:, None]
    d_ids = a * -jnp.expm1(logq_k) - jnp.exp(logq_k) * others
    d_x = d_x.at[rows, ids].set(d_ids)  # ids are distinct per token
    return d_x / temperature, g_lt, g_lm

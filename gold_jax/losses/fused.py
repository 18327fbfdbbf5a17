"""Chunked fused lm-head + generalized JSD: logits never exist for all tokens at once.

Tokens are cut into chunks of `chunk_size`; each chunk's logits are built by
hidden @ lm_head (float32 accumulation), turned into per-token losses, and
dropped. The chunk body is wrapped in jax.checkpoint inside lax.map, so the
backward pass recomputes a chunk's logits instead of storing them: peak memory
holds one chunk of logits (plus the [H, V] lm-head gradient), not N x V.
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from gold_jax.losses import validation as val
from gold_jax.losses.core import compute_dtype, reduce_tokens
from gold_jax.losses.dense import dense_per_token
from gold_jax.losses.topk import topk_per_token

FUSED_MODES = ("tail", "renormalize", "dense")


def _chunked(x: jax.Array | None, n_lead: int, n_tokens: int, chunk: int, n_chunks: int):
    """[*lead, ...] -> [n_chunks, chunk, ...], zero-padding the token axis."""
    if x is None:
        return None
    x = x.reshape(n_tokens, *x.shape[n_lead:])
    pad = n_chunks * chunk - n_tokens
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(n_chunks, chunk, *x.shape[1:])


def fused_jsd(hidden: jax.Array, lm_head: jax.Array, teacher_logprobs: jax.Array | None,
              teacher_ids: jax.Array | None, mask: jax.Array, *, beta: float = 0.5, temperature: float = 1.0,
              reduction: str = "batchmean", mode: str = "tail", teacher_logits: jax.Array | None = None,
              chunk_size: int = 512, teacher_logmass: jax.Array | None = None,
              vocab_size: int | None = None) -> jax.Array:
    """Generalized JSD of softmax(hidden @ lm_head / T) against the teacher, chunk by chunk.

    hidden [N, H] or [B, T, H]; lm_head [H, V]. mode "tail"/"renormalize" take
    a top-k teacher (as `topk_jsd`); mode "dense" takes `teacher_logits` [..., V]
    (as `generalized_jsd`) and ignores teacher_logprobs / teacher_ids.
    """
    beta, temperature = val.check_beta(beta), val.check_temperature(temperature)
    val.check_reduction(reduction)
    mode = val.check_mode(mode, FUSED_MODES)
    if hidden.ndim < 2:
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got shape {hidden.shape}")
    if lm_head.ndim != 2 or lm_head.shape[0] != hidden.shape[-1]:
        raise ValueError(f"lm_head must be [H, V] with H = {hidden.shape[-1]} (hidden's last axis), "
                         f"got shape {lm_head.shape}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    lead = hidden.shape[:-1]
    logits_shape = (*lead, lm_head.shape[1])
    vocab_size = val.check_vocab_size(vocab_size, lm_head.shape[1])
    if mode == "dense":
        if teacher_logits is None:
            raise ValueError('mode="dense" needs teacher_logits [..., V]')
        if tuple(teacher_logits.shape) != logits_shape:
            raise ValueError(f"teacher_logits has shape {tuple(teacher_logits.shape)}, expected {logits_shape}")
        val.check_mask(mask, lead)
    else:
        if teacher_logprobs is None or teacher_ids is None:
            raise ValueError(f'mode="{mode}" needs teacher_logprobs and teacher_ids (or use mode="dense")')
        val.check_topk(logits_shape, teacher_logprobs, teacher_ids, mask, teacher_logmass, vocab_size)

    n_tokens = math.prod(lead)
    chunk = min(int(chunk_size), n_tokens)
    n_chunks = -(-n_tokens // chunk)
    dt = compute_dtype(hidden, lm_head)
    if mode == "dense":
        xs = (hidden, teacher_logits)
    else:
        xs = (hidden, teacher_logprobs, teacher_ids, teacher_logmass)
    xs = tuple(_chunked(x, len(lead), n_tokens, chunk, n_chunks) for x in xs)

    @jax.checkpoint
    def chunk_loss(w, xs_c):
        logits = jnp.dot(xs_c[0], w, preferred_element_type=dt)
        if mode == "dense":
            return dense_per_token(logits, xs_c[1], beta=beta, temperature=temperature, vocab_size=vocab_size)
        _, lt, ids, lm = xs_c
        return topk_per_token(logits, lt, ids, lm, beta=beta, temperature=temperature, mode=mode,
                              vocab_size=vocab_size)

    per_token = lax.map(lambda xs_c: chunk_loss(lm_head, xs_c), xs)
    per_token = per_token.reshape(-1)[:n_tokens].reshape(lead)
    return reduce_tokens(per_token, mask, reduction, vocab_size)

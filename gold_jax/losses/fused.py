"""Chunked fused lm-head + generalized JSD: logits never exist for all tokens at once.

Tokens are cut into chunks of `chunk_size` rows; each chunk's logits are built
by hidden @ lm_head (float32 accumulation), turned into per-token losses, and
dropped. The gradient is a custom VJP (`_fused_bwd`) that walks the chunks
again: it recomputes the chunk's logits, turns them into d(loss)/d(logits) and
contracts that at once into d(hidden) (written in place, chunk by chunk) and
d(lm_head) (accumulated in a float32 loop carry, column tile by column tile,
so that XLA aliases it with the returned gradient and no [H, V] product is
ever a temporary). Dense teacher: the closed form of dense_vjp from six
statistics per token, so the backward pass holds only [chunk, tile] blocks and
peak memory is one chunk of logits in the forward pass. Top-k teacher: the
chain rule through the k + 1 bucket log-probabilities in closed form (autodiff
only of the small [chunk, k + 1] function). Reverse mode only (no jvp).
"""
from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from gold_jax.losses import validation as val
from gold_jax.losses.core import (NEG_FLOOR, compute_dtype, masked_normalizer, reduce_tokens,
                                  topk_token_terms, vocab_valid)
from gold_jax.losses.dense_vjp import CHUNK_ELEMS, dense_rows_grad, dense_rows_stats
from gold_jax.losses.topk import topk_mask, topk_per_token

FUSED_MODES = ("tail", "renormalize", "dense")


# Elements of one [rows, columns] tile of the backward pass (16 MiB in float32), and of one row
# group of the CPU forward pass (as dense_vjp.CHUNK_ELEMS: a 150k vocabulary walks one row at a time).
TILE_ELEMS = 1 << 22
ROW_ELEMS = CHUNK_ELEMS


def _block_start(i, size: int, block: int):
    """First index of block i; the last block is shifted back to end at `size` (it overlaps its neighbour)."""
    return jnp.minimum(i * block, size - block)


def _rows(x, start, n: int):
    return None if x is None else lax.dynamic_slice_in_dim(x, start, n, axis=0)


def _cols(x, start, n: int):
    return lax.dynamic_slice_in_dim(x, start, n, axis=x.ndim - 1)


def _logits(h_c, w):
    return jnp.dot(h_c, w, preferred_element_type=compute_dtype(h_c, w))


def _geometry(cfg, hidden, w):
    """(tokens, rows per chunk, chunks, columns per tile, tiles)."""
    n_tokens, chunk = hidden.shape[0], cfg[4]
    n_cols = w.shape[1]
    cols = max(1, min(n_cols, TILE_ELEMS // max(chunk, w.shape[0])))
    return n_tokens, chunk, -(-n_tokens // chunk), cols, -(-n_cols // cols)


def _dense_chunk_stats(cfg, s, teacher, start):
    """(loss [c], stats [c, 6]) of the chunk's logits s [c, V] against teacher rows start.. of teacher [N, V].

    XLA:CPU materialises every step of the row reductions, so there the rows
    are walked in cache-sized groups, each sliced straight out of the teacher
    (no copy of the chunk's teacher rows). GPU/TPU fuse them in one pass.
    """
    _, beta, temperature, vocab_size, chunk = cfg
    fn = lambda s_, t_: dense_rows_stats(s_, t_, beta, temperature, vocab_size)  # noqa: E731
    group = max(d for d in range(1, chunk + 1) if chunk % d == 0 and d <= max(1, ROW_ELEMS // s.shape[-1]))

    def by_rows(s, teacher, start):
        def body(r, carry):
            loss, stats = carry
            l_g, st_g = fn(_rows(s, r * group, group), _rows(teacher, start + r * group, group))
            return (lax.dynamic_update_slice_in_dim(loss, l_g, r * group, axis=0),
                    lax.dynamic_update_slice_in_dim(stats, st_g, r * group, axis=0))
        init = (jnp.zeros((chunk,), s.dtype), jnp.zeros((chunk, 6), s.dtype))
        return lax.fori_loop(0, chunk // group, body, init)

    return lax.platform_dependent(s, teacher, start, cpu=by_rows,
                                  default=lambda s, teacher, start: fn(s, _rows(teacher, start, chunk)))


def _topk_chunk_grad(cfg, s, lt, ids, lm, ct):
    """(d(sum ct * loss)/d(logits) [c, V], d/d teacher_logprobs, d/d teacher_logmass) of one chunk, top-k teacher.

    The loss depends on the logits x = s / T only through the k + 1 bucket
    log-probabilities logq_k = x_k - lse(x) and logq_tail = lse_rest(x) - lse(x)
    ("renormalize": through x_k alone). Autodiff of that small [c, k + 1]
    function gives a = dL/dlogq_k and b = dL/dlogq_tail, and the chain rule is
    closed-form: dL/dx_i = a_j [i = id_j] + b [i in rest] q_i / q_tail
    - q_i (sum_j a_j + b), with q = softmax(x). One elementwise pass plus a
    scatter of k values per row, instead of autodiff's [c, V] cotangents.
    """
    mode, beta, temperature, vocab_size, _ = cfg
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


def _forward(cfg, hidden, w, teacher):
    """Per-token losses [N] (and dense statistics [N, 6]) chunk by chunk; one chunk of logits at a time."""
    mode, beta, temperature, vocab_size, _ = cfg
    n_tokens, chunk, n_chunks, _, _ = _geometry(cfg, hidden, w)
    dt = compute_dtype(hidden, w)
    loss = jnp.zeros((n_tokens,), dt)
    stats = jnp.zeros((n_tokens, 6), dt) if mode == "dense" else None

    def body(i, carry):
        loss, stats = carry
        start = _block_start(i, n_tokens, chunk)
        s = _logits(_rows(hidden, start, chunk), w)
        if mode == "dense":
            l_c, st_c = _dense_chunk_stats(cfg, s, teacher[0], start)
            stats = lax.dynamic_update_slice_in_dim(stats, st_c.astype(dt), start, axis=0)
        else:
            lt, ids, lm = (_rows(x, start, chunk) for x in teacher)
            l_c = topk_per_token(s, lt, ids, lm, beta=beta, temperature=temperature, mode=mode,
                                 vocab_size=vocab_size)
        return lax.dynamic_update_slice_in_dim(loss, l_c.astype(dt), start, axis=0), stats

    return lax.fori_loop(0, n_chunks, body, (loss, stats))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_rows(cfg, hidden, w, teacher):
    """Per-token JSD [N] of hidden [N, H] @ w [H, V] against the teacher rows (cfg: mode, beta, T, V_real, chunk)."""
    return _forward(cfg, hidden, w, teacher)[0]


def _fused_fwd(cfg, hidden, w, teacher):
    # symbolic_zeros: every array leaf arrives as CustomVJPPrimal(value, perturbed). Which inputs
    # need a cotangent is recorded in the residuals' tree structure (None = not needed), so that
    # the backward pass builds no [N, V] teacher gradient that nobody asked for.
    want = lambda x: None if x is None or not x.perturbed else ()  # noqa: E731
    flags = (want(hidden), want(w), tuple(want(x) for x in teacher))
    hidden, w = hidden.value, w.value
    teacher = tuple(None if x is None else x.value for x in teacher)
    loss, stats = _forward(cfg, hidden, w, teacher)
    return loss, (hidden, w, teacher, stats, flags)


def _fused_bwd(cfg, res, ct):
    """Per chunk: recompute the logits, form d(loss)/d(logits) and contract it at once, tile by tile.

    The chunk's d(hidden) rows are written in place; d(lm_head) is accumulated
    column tile by column tile in the loop carry, which XLA aliases with the
    returned gradient. Dense teacher: the closed form of dense_vjp needs only
    the forward pass's per-token statistics, so the chunk's logits are
    recomputed one [chunk, tile] block at a time and never exist whole. Top-k
    teacher: `_topk_chunk_grad` gives the chunk's d(logits) [chunk, V] in one pass.
    The last chunk (and the last tile) overlap their neighbours: repeated rows
    and columns are masked out of every sum.
    """
    hidden, w, teacher, stats, (want_h, want_w, want_t) = res
    mode, beta, temperature, vocab_size, _ = cfg
    n_tokens, chunk, n_chunks, cols, n_tiles = _geometry(cfg, hidden, w)
    n_cols = w.shape[1]
    dt = compute_dtype(hidden, w)
    in_dt = jnp.promote_types(hidden.dtype, w.dtype)
    if isinstance(ct, SymbolicZero):
        ct = jnp.zeros((n_tokens,), dt)
    ct = ct.astype(dt)
    want_t = tuple(x is not None for x in want_t)
    want_h, want_w = want_h is not None, want_w is not None
    d_h = jnp.zeros(hidden.shape, hidden.dtype) if want_h else None
    d_w = jnp.zeros(w.shape, dt) if want_w else None
    d_t = tuple(jnp.zeros(x.shape, x.dtype) if wt else None for x, wt in zip(teacher, want_t))
    kw = dict(beta=beta, temperature=temperature, vocab_size=vocab_size)

    def chunk_body(i, carry):
        d_h, d_w, d_t = carry
        start = _block_start(i, n_tokens, chunk)
        h_c, ct_c = _rows(hidden, start, chunk), _rows(ct, start, chunk)
        # Rows repeated from the previous chunk: their d(hidden) is rewritten, never added to d(lm_head).
        h_fresh = jnp.where(((start + jnp.arange(chunk)) >= i * chunk)[:, None], h_c, 0).astype(in_dt)
        if mode == "dense":
            st_c = _rows(stats, start, chunk)
        else:
            lt, ids, lm = (_rows(x, start, chunk) for x in teacher)
            d_s_full, g_lt, g_lm = _topk_chunk_grad(cfg, _logits(h_c, w), lt, ids, lm, ct_c)
            g_t = (g_lt, None, g_lm)
            d_t = tuple(None if d is None else lax.dynamic_update_slice_in_dim(d, g.astype(d.dtype), start, axis=0)
                        for d, g in zip(d_t, g_t))

        def tile_body(j, carry):
            g_h, d_w, d_t = carry
            col = _block_start(j, n_cols, cols)
            w_j = _cols(w, col, cols)
            if mode == "dense":
                s_j, t_j = _logits(h_c, w_j), _cols(_rows(teacher[0], start, chunk), col, cols)
                d_s = dense_rows_grad(s_j, t_j, st_c, ct_c, wrt="student", offset=col, col_lo=j * cols, **kw)
                if want_t[0]:
                    g_t = dense_rows_grad(s_j, t_j, st_c, ct_c, wrt="teacher", offset=col, **kw)
                    d_t = (lax.dynamic_update_slice(d_t[0], g_t.astype(d_t[0].dtype), (start, col)),)
            else:
                fresh = (col + jnp.arange(cols)) >= j * cols
                d_s = jnp.where(fresh, _cols(d_s_full, col, cols), 0)
            d_s = d_s.astype(in_dt)
            if g_h is not None:
                g_h = g_h + jnp.dot(d_s, w_j.T, preferred_element_type=dt)
            if d_w is not None:
                upd = lax.dot_general(h_fresh, d_s, (((0,), (0,)), ((), ())), preferred_element_type=dt)
                d_w = lax.dynamic_update_slice(d_w, _cols(d_w, col, cols) + upd, (0, col))
            return g_h, d_w, d_t

        g_h = jnp.zeros((chunk, hidden.shape[1]), dt) if want_h else None
        if want_h or want_w or (mode == "dense" and want_t[0]):
            g_h, d_w, d_t = lax.fori_loop(0, n_tiles, tile_body, (g_h, d_w, d_t))
        if want_h:
            d_h = lax.dynamic_update_slice_in_dim(d_h, g_h.astype(d_h.dtype), start, axis=0)
        return d_h, d_w, d_t

    d_h, d_w, d_t = lax.fori_loop(0, n_chunks, chunk_body, (d_h, d_w, d_t))
    return d_h, None if d_w is None else d_w.astype(w.dtype), d_t


_fused_rows.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


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
    flat = lambda x: None if x is None else x.reshape(n_tokens, *x.shape[len(lead):])  # noqa: E731
    if mode == "dense":
        teacher = (flat(teacher_logits),)
    else:
        teacher = (flat(teacher_logprobs), flat(teacher_ids).astype(jnp.int32), flat(teacher_logmass))
    cfg = (mode, beta, temperature, vocab_size, chunk)
    per_token = _fused_rows(cfg, flat(hidden), lm_head, teacher).reshape(lead)
    return reduce_tokens(per_token, mask, reduction, vocab_size)

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
only of the small [chunk, k + 1] function). Hidden teacher (mode "hidden"):
the teacher's final normed hidden states [N, Ht] and its lm head [Ht, Vt]
replace teacher logits; each chunk's teacher logits are built in the same loop
as the student's (and rebuilt tile by tile in the backward pass), then treated
exactly as the dense teacher. No [N, V] tensor exists anywhere, and the teacher
gets no gradient. Reverse mode only (no jvp).

Vocabulary widths: columns at or past `vocab_size` (the tokenizer's size) are
embedding padding and masked. In mode "hidden" the two heads may have
different widths as long as both cover vocab_size: only the first
min(V_student, V_teacher) columns are walked (the rest are padding of one head
or the other); the student's columns past that get a zero gradient.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from gold_jax.losses import validation as val
from gold_jax.losses.core import compute_dtype, reduce_tokens
from gold_jax.losses.dense_vjp import CHUNK_ELEMS, dense_rows_grad, dense_rows_stats
from gold_jax.losses.fused_topk import topk_chunk_grad
from gold_jax.losses.topk import topk_per_token

FUSED_MODES = ("tail", "renormalize", "dense", "hidden")
DENSE_MODES = ("dense", "hidden")  # exact full-vocabulary JSD from per-token statistics


class FusedSettings(NamedTuple):
    """Static settings of one fused loss (hashable: a nondiff argument of the custom VJP)."""
    mode: str           # one of FUSED_MODES
    beta: float
    temperature: float
    vocab_size: int     # real vocabulary: columns at or past it are embedding padding
    chunk: int          # token rows per chunk
    width: int          # logit columns walked (the student head's, or the narrower head's in mode "hidden")


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


def _geometry(cfg: FusedSettings, hidden, w):
    """(tokens, rows per chunk, chunks, columns per tile, tiles)."""
    n_tokens, chunk, n_cols = hidden.shape[0], cfg.chunk, cfg.width
    cols = max(1, min(n_cols, TILE_ELEMS // max(chunk, w.shape[0])))
    return n_tokens, chunk, -(-n_tokens // chunk), cols, -(-n_cols // cols)


def _chunk_logits(cfg: FusedSettings, h_c, w, teacher, start):
    """(student, teacher-or-None) logits [c, width] of the chunk at `start`; hidden teacher: built here."""
    s = _logits(h_c, w)[:, :cfg.width]
    if cfg.mode != "hidden":
        return s, None
    t_hidden, t_head = teacher
    return s, _logits(_rows(t_hidden, start, cfg.chunk), t_head)[:, :cfg.width]


def _dense_chunk_stats(cfg: FusedSettings, s, teacher, start):
    """(loss [c], stats [c, 6]) of the chunk's logits s [c, V] against teacher rows start.. of teacher [N, V].

    (A hidden teacher passes its chunk's own logits [c, V] with start 0.)

    XLA:CPU materialises every step of the row reductions, so there the rows
    are walked in cache-sized groups, each sliced straight out of the teacher
    (no copy of the chunk's teacher rows). GPU/TPU fuse them in one pass.
    """
    chunk = cfg.chunk
    fn = lambda s_, t_: dense_rows_stats(s_, t_, cfg.beta, cfg.temperature, cfg.vocab_size)  # noqa: E731
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


def _forward(cfg: FusedSettings, hidden, w, teacher):
    """Per-token losses [N] (and dense statistics [N, 6]) chunk by chunk; one chunk of logits at a time."""
    n_tokens, chunk, n_chunks, _, _ = _geometry(cfg, hidden, w)
    dt = compute_dtype(hidden, w)
    loss = jnp.zeros((n_tokens,), dt)
    stats = jnp.zeros((n_tokens, 6), dt) if cfg.mode in DENSE_MODES else None

    def body(i, carry):
        loss, stats = carry
        start = _block_start(i, n_tokens, chunk)
        s, t = _chunk_logits(cfg, _rows(hidden, start, chunk), w, teacher, start)
        if cfg.mode in DENSE_MODES:
            l_c, st_c = (_dense_chunk_stats(cfg, s, teacher[0], start) if t is None
                         else _dense_chunk_stats(cfg, s, t, 0))
            stats = lax.dynamic_update_slice_in_dim(stats, st_c.astype(dt), start, axis=0)
        else:
            lt, ids, lm = (_rows(x, start, chunk) for x in teacher)
            l_c = topk_per_token(s, lt, ids, lm, beta=cfg.beta, temperature=cfg.temperature, mode=cfg.mode,
                                 vocab_size=cfg.vocab_size)
        return lax.dynamic_update_slice_in_dim(loss, l_c.astype(dt), start, axis=0), stats

    return lax.fori_loop(0, n_chunks, body, (loss, stats))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_rows(cfg, hidden, w, teacher):
    """Per-token JSD [N] of hidden [N, H] @ w [H, V] against the teacher (rows, top-k or hidden states + head)."""
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
    teacher: `fused_topk.topk_chunk_grad` gives the chunk's d(logits) [chunk, V] in one pass.
    The last chunk (and the last tile) overlap their neighbours: repeated rows
    and columns are masked out of every sum.
    """
    hidden, w, teacher, stats, (want_h, want_w, want_t) = res
    mode = cfg.mode
    n_tokens, chunk, n_chunks, cols, n_tiles = _geometry(cfg, hidden, w)
    n_cols = cfg.width
    dt = compute_dtype(hidden, w)
    in_dt = jnp.promote_types(hidden.dtype, w.dtype)
    if isinstance(ct, SymbolicZero):
        ct = jnp.zeros((n_tokens,), dt)
    ct = ct.astype(dt)
    # A hidden teacher never gets a gradient (fused_jsd stops it): its cotangents stay None.
    want_t = tuple(x is not None and mode != "hidden" for x in want_t)
    want_h, want_w = want_h is not None, want_w is not None
    d_h = jnp.zeros(hidden.shape, hidden.dtype) if want_h else None
    d_w = jnp.zeros(w.shape, dt) if want_w else None
    d_t = tuple(jnp.zeros(x.shape, x.dtype) if wt else None for x, wt in zip(teacher, want_t))
    kw = dict(beta=cfg.beta, temperature=cfg.temperature, vocab_size=cfg.vocab_size)

    def chunk_body(i, carry):
        d_h, d_w, d_t = carry
        start = _block_start(i, n_tokens, chunk)
        h_c, ct_c = _rows(hidden, start, chunk), _rows(ct, start, chunk)
        # Rows repeated from the previous chunk: their d(hidden) is rewritten, never added to d(lm_head).
        h_fresh = jnp.where(((start + jnp.arange(chunk)) >= i * chunk)[:, None], h_c, 0).astype(in_dt)
        if mode in DENSE_MODES:
            st_c = _rows(stats, start, chunk)
            th_c = _rows(teacher[0], start, chunk) if mode == "hidden" else None
        else:
            lt, ids, lm = (_rows(x, start, chunk) for x in teacher)
            d_s_full, g_lt, g_lm = topk_chunk_grad(_logits(h_c, w), lt, ids, lm, ct_c, mode=mode, **kw)
            g_t = (g_lt, None, g_lm)
            d_t = tuple(None if d is None else lax.dynamic_update_slice_in_dim(d, g.astype(d.dtype), start, axis=0)
                        for d, g in zip(d_t, g_t))

        def tile_body(j, carry):
            g_h, d_w, d_t = carry
            col = _block_start(j, n_cols, cols)
            w_j = _cols(w, col, cols)
            if mode in DENSE_MODES:
                s_j = _logits(h_c, w_j)
                t_j = (_logits(th_c, _cols(teacher[1], col, cols)) if mode == "hidden"
                       else _cols(_rows(teacher[0], start, chunk), col, cols))
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


def _check_hidden_teacher(lead: tuple, student_width: int, teacher_hidden, teacher_head,
                          vocab_size) -> tuple[int, int]:
    """(vocab_size, columns walked) for a hidden teacher; both heads must cover the tokenizer's ids."""
    if teacher_hidden is None or teacher_head is None:
        raise ValueError('mode="hidden" needs teacher_hidden [..., Ht] and teacher_head [Ht, V_teacher]')
    if tuple(teacher_hidden.shape[:-1]) != tuple(lead) or teacher_hidden.ndim != len(lead) + 1:
        raise ValueError(f"teacher_hidden has shape {tuple(teacher_hidden.shape)}, expected {tuple(lead)} + (Ht,) "
                         "(the student hidden's token shape)")
    if teacher_head.ndim != 2 or teacher_head.shape[0] != teacher_hidden.shape[-1]:
        raise ValueError(f"teacher_head must be [Ht, V] with Ht = {teacher_hidden.shape[-1]} (teacher_hidden's "
                         f"last axis), got shape {tuple(teacher_head.shape)}")
    width = min(student_width, int(teacher_head.shape[1]))
    if vocab_size is None and teacher_head.shape[1] != student_width:
        raise ValueError(f"teacher_head has {teacher_head.shape[1]} columns and lm_head {student_width}: pass "
                         "vocab_size (the tokenizer's size; both heads must cover it)")
    if vocab_size is not None and not isinstance(vocab_size, bool) and isinstance(vocab_size, numbers.Integral) \
            and int(vocab_size) > width:
        raise ValueError(f"vocab_size={vocab_size} is more than the narrower head covers: lm_head has "
                         f"{student_width} columns, teacher_head {teacher_head.shape[1]}")
    return val.check_vocab_size(vocab_size, width), width


def fused_jsd(hidden: jax.Array, lm_head: jax.Array, teacher_logprobs: jax.Array | None,
              teacher_ids: jax.Array | None, mask: jax.Array, *, beta: float = 0.5, temperature: float = 1.0,
              reduction: str = "batchmean", mode: str = "tail", teacher_logits: jax.Array | None = None,
              chunk_size: int = 512, teacher_logmass: jax.Array | None = None,
              vocab_size: int | None = None, teacher_hidden: jax.Array | None = None,
              teacher_head: jax.Array | None = None) -> jax.Array:
    """Generalized JSD of softmax(hidden @ lm_head / T) against the teacher, chunk by chunk.

    hidden [N, H] or [B, T, H]; lm_head [H, V]. mode "tail"/"renormalize" take
    a top-k teacher (as `topk_jsd`); mode "dense" takes `teacher_logits` [..., V]
    (as `generalized_jsd`) and ignores teacher_logprobs / teacher_ids; mode
    "hidden" takes the teacher's final normed hidden states `teacher_hidden`
    [..., Ht] and its head `teacher_head` [Ht, V'] (teacher logits =
    teacher_hidden @ teacher_head, never materialised; no gradient flows to
    either). With V' != V, `vocab_size` must be given and both must cover it.
    """
    beta, temperature = val.check_beta(beta), val.check_temperature(temperature)
    val.check_reduction(reduction)
    mode = val.check_mode(mode, FUSED_MODES)
    val.check_hidden_head(hidden, lm_head, chunk_size)
    lead = hidden.shape[:-1]
    logits_shape = (*lead, lm_head.shape[1])
    width = int(lm_head.shape[1])
    if mode == "hidden":
        vocab_size, width = _check_hidden_teacher(lead, width, teacher_hidden, teacher_head, vocab_size)
        val.check_mask(mask, lead)
    else:
        vocab_size = val.check_vocab_size(vocab_size, lm_head.shape[1])
    if mode == "dense":
        if teacher_logits is None:
            raise ValueError('mode="dense" needs teacher_logits [..., V]')
        if tuple(teacher_logits.shape) != logits_shape:
            raise ValueError(f"teacher_logits has shape {tuple(teacher_logits.shape)}, expected {logits_shape}")
        val.check_mask(mask, lead)
    elif mode != "hidden":
        if teacher_logprobs is None or teacher_ids is None:
            raise ValueError(f'mode="{mode}" needs teacher_logprobs and teacher_ids (or use mode="dense")')
        val.check_topk(logits_shape, teacher_logprobs, teacher_ids, mask, teacher_logmass, vocab_size)

    n_tokens = math.prod(lead)
    chunk = min(int(chunk_size), n_tokens)
    flat = lambda x: None if x is None else x.reshape(n_tokens, *x.shape[len(lead):])  # noqa: E731
    if mode == "dense":
        teacher = (flat(teacher_logits),)
    elif mode == "hidden":
        # The teacher is frozen: stopping its gradient here lets the custom VJP skip it outright.
        teacher = (lax.stop_gradient(flat(teacher_hidden)), lax.stop_gradient(teacher_head))
    else:
        teacher = (flat(teacher_logprobs), flat(teacher_ids).astype(jnp.int32), flat(teacher_logmass))
    cfg = FusedSettings(mode, beta, temperature, vocab_size, chunk, width)
    per_token = _fused_rows(cfg, flat(hidden), lm_head, teacher).reshape(lead)
    return reduce_tokens(per_token, mask, reduction, vocab_size)


def fused_hidden_jsd(hidden: jax.Array, lm_head: jax.Array, teacher_hidden: jax.Array, teacher_head: jax.Array,
                     mask: jax.Array, **kw) -> jax.Array:
    """Exact dense JSD against a teacher given by its final hidden states and lm head (`fused_jsd` mode "hidden")."""
    return fused_jsd(hidden, lm_head, None, None, mask, mode="hidden", teacher_hidden=teacher_hidden,
                     teacher_head=teacher_head, **kw)

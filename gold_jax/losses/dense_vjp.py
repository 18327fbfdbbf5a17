"""Dense generalized JSD per token with a closed-form gradient, streamed over row chunks.

Autodiff of the log-space formula keeps about seven [N, V] temporaries
(log-probs, probabilities, log-mixture and their cotangents); each is a fresh
buffer the size of the logits, which on a CPU costs more than the math. The
closed form needs per-token statistics only. With q = softmax(s), p = softmax(t):

    dL/ds = q (g - <q, g>),  g = (1-beta) (log q - log m)   (beta = 1: g = log q - log p)
    dL/dt = p (h - <p, h>),  h = beta (log p - log m)       (beta = 0: h = log p - log q)

and dL/ds = q - p at beta = 0, dL/dt = p - q at beta = 1. The token loss is
<q, g> + <p, h>. So the forward pass keeps six numbers per token (on a CPU it
walks the tokens in row chunks that stay in cache), and the backward pass is
one elementwise sweep: the only [N, V] buffer written is the gradient itself.
A custom_vjp, so reverse mode only (no jvp / jacfwd).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from gold_jax.losses.core import NEG_FLOOR, compute_dtype, vocab_valid

# Elements per row chunk of the CPU forward pass: its ~10 float32 temporaries (1 MiB each)
# stay in cache; a 150k vocabulary gets 1 row per loop trip, 32k gets 8.
CHUNK_ELEMS = 1 << 18


def map_rows(fn, arrays: tuple, out_shapes: tuple, chunk: int) -> tuple:
    """fn over groups of about `chunk` rows of `arrays` (all [N, ...]); outputs assembled into [N, ...].

    Group i holds rows i, i + n, i + 2n, ... for n loop trips (n divides N):
    a [N, ...] array viewed as [N / n, n, ...] is sliced on its minor axis, so
    when the rows are sharded over the batch axes every trip takes rows from
    every shard and nothing is gathered, padded or copied whole.
    """
    n_rows = arrays[0].shape[0]
    if n_rows <= chunk:
        return fn(*arrays)
    n = next(d for d in range(-(-n_rows // chunk), n_rows + 1) if n_rows % d == 0)
    grouped = tuple(a.reshape(n_rows // n, n, *a.shape[1:]) for a in arrays)

    def body(i, outs):
        res = fn(*(lax.dynamic_index_in_dim(a, i, 1, keepdims=False) for a in grouped))
        return tuple(lax.dynamic_update_index_in_dim(o, r, i, 1) for o, r in zip(outs, res))

    outs = tuple(jnp.zeros((n_rows // n, n, *o.shape[1:]), o.dtype) for o in out_shapes)
    outs = lax.fori_loop(0, n, body, outs)
    return tuple(o.reshape(o.shape[0] * n, *o.shape[2:]) for o in outs)


def _probs(x, keep, m, log_sum, temperature):
    """(log-probs, probs) from raw logits and their statistics; padding columns get (0, 0)."""
    logx = (x - m[:, None]) / temperature - log_sum[:, None]
    if keep is None:
        return logx, jnp.exp(logx)
    return jnp.where(keep, logx, 0.0), jnp.where(keep, jnp.exp(logx), 0.0)


def _softmax(x, keep, temperature):
    """(max, log-sum, log-probs, probs) of x / T, reusing the exponentials of the sum.

    The max is taken and subtracted before scaling: x - m is exact and identical
    in every fusion, so the backward pass, which recomputes the probabilities
    from (m, log-sum), finds exactly 0 at the top logit even if XLA scales by T
    differently there. A one-ulp mismatch at a logit of 1e3 would otherwise
    leak a gradient into a saturated softmax.
    """
    if keep is not None:
        x = jnp.where(keep, x, -jnp.inf)  # padding: exp -> 0 (the max of a row is always real)
    m = jnp.max(x, axis=-1)
    y = (x - m[:, None]) / temperature
    e = jnp.exp(y)
    z = jnp.sum(e, axis=-1)
    logx = y - jnp.log(z)[:, None]
    return m, jnp.log(z), (logx if keep is None else jnp.where(keep, logx, 0.0)), e * (1.0 / z)[:, None]


def _factors(logq, logp, q, p, beta):
    """(g, h) of the module docstring; None where the closed form needs none (beta = 0 / 1)."""
    if beta == 0.0:
        return None, logp - logq
    if beta == 1.0:
        return logq - logp, None
    # log m of a mixture that underflows is floored: q and p are then ~0, so are their terms.
    logm = jnp.log(jnp.maximum(beta * p + (1.0 - beta) * q, jnp.finfo(q.dtype).tiny))
    return (1.0 - beta) * (logq - logm), beta * (logp - logm)


def _prepare(s, t, vocab_size, offset=0, col_lo=None):
    """Upcast and floor; keep = real vocabulary columns (at `offset`), and only those >= col_lo if given."""
    dt = compute_dtype(s, t)
    s, t = jnp.maximum(s.astype(dt), NEG_FLOOR), jnp.maximum(t.astype(dt), NEG_FLOOR)
    if isinstance(offset, int):
        valid = vocab_valid(s.shape[-1], vocab_size, offset)
    else:  # a traced column offset: the block may reach the padding
        valid = offset + jnp.arange(s.shape[-1]) < vocab_size
    if col_lo is not None:
        fresh = offset + jnp.arange(s.shape[-1]) >= col_lo
        valid = fresh if valid is None else valid & fresh
    return s, t, (None if valid is None else jnp.broadcast_to(valid, s.shape))


def _forward_chunk(s, t, beta, temperature, vocab_size):
    s, t, keep = _prepare(s, t, vocab_size)
    ms, ls, logq, q = _softmax(s, keep, temperature)
    mt, lt, logp, p = _softmax(t, keep, temperature)
    g, h = _factors(logq, logp, q, p, beta)
    zero = jnp.zeros(s.shape[:1], s.dtype)
    cq = zero if g is None else jnp.sum(q * g, axis=-1)
    cp = zero if h is None else jnp.sum(p * h, axis=-1)
    return cq + cp, jnp.stack([ms, ls, mt, lt, cq, cp], axis=-1)


def _backward_chunk(s, t, stats, ct, beta, temperature, vocab_size, wrt, offset=0, col_lo=None):
    x_dtype = (s if wrt == "student" else t).dtype
    s, t, keep = _prepare(s, t, vocab_size, offset, col_lo)
    ms, ls, mt, lt, cq, cp = (stats[:, i] for i in range(6))
    (logq, q), (logp, p) = _probs(s, keep, ms, ls, temperature), _probs(t, keep, mt, lt, temperature)
    g, h = _factors(logq, logp, q, p, beta)
    if wrt == "student":
        d = q - p if g is None else q * (g - cq[:, None])
    else:
        d = p - q if h is None else p * (h - cp[:, None])
    return ((ct / temperature)[:, None] * d).astype(x_dtype)


def dense_rows(s: jax.Array, t: jax.Array, beta: float, temperature: float, vocab_size: int,
               chunk_elems: int | None = None) -> jax.Array:
    """Per-row JSD [N] of student / teacher logits [N, V] (columns >= vocab_size ignored)."""
    return _dense_rows(s, t, beta, temperature, vocab_size, chunk_elems or CHUNK_ELEMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _dense_rows(s, t, beta, temperature, vocab_size, chunk_elems):
    return _fwd(s, t, beta, temperature, vocab_size, chunk_elems)[0]


def dense_rows_stats(s: jax.Array, t: jax.Array, beta: float, temperature: float,
                     vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """(per-row JSD [N], statistics [N, 6]) of full rows in one pass, for callers that own the VJP and the loop."""
    return _forward_chunk(s, t, beta, temperature, vocab_size)


def dense_rows_grad(s: jax.Array, t: jax.Array, stats: jax.Array, ct: jax.Array, beta: float,
                    temperature: float, vocab_size: int, wrt: str, offset=0, col_lo=None) -> jax.Array:
    """Closed-form d(sum_i ct_i JSD_i) / d(s or t) (wrt "student" / "teacher") from `dense_rows_stats`.

    s, t may be a column block [N, v] of the rows starting at column `offset`:
    the gradient is elementwise given the per-row statistics. Columns below
    `col_lo` (already covered by an overlapping block) get exactly 0.
    """
    return _backward_chunk(s, t, stats, ct, beta=beta, temperature=temperature, vocab_size=vocab_size, wrt=wrt,
                           offset=offset, col_lo=col_lo)


def _fwd(s, t, beta, temperature, vocab_size, chunk_elems):
    n, dt = s.shape[0], compute_dtype(s, t)
    fn = functools.partial(_forward_chunk, beta=beta, temperature=temperature, vocab_size=vocab_size)
    out_shapes = (jax.ShapeDtypeStruct((n,), dt), jax.ShapeDtypeStruct((n, 6), dt))
    chunk = max(1, chunk_elems // s.shape[-1])
    # XLA:CPU materialises every step of the row reductions: on a CPU walk the rows in chunks that
    # stay in cache. GPU/TPU fuse them into one pass over the logits and need no loop.
    loss, stats = lax.platform_dependent(s, t, cpu=lambda a, b: map_rows(fn, (a, b), out_shapes, chunk), default=fn)
    return loss, (s, t, stats)


def _bwd(beta, temperature, vocab_size, chunk_elems, res, ct):
    # Purely elementwise given the statistics: one fused pass that writes each gradient directly.
    s, t, stats = res
    kw = dict(beta=beta, temperature=temperature, vocab_size=vocab_size)
    return (_backward_chunk(s, t, stats, ct, wrt="student", **kw),
            _backward_chunk(s, t, stats, ct, wrt="teacher", **kw))


_dense_rows.defvjp(_fwd, _bwd)

"""Token sampling math: temperature, top-k, top-p, and the log-probs of the choice.

All sampling parameters are traced scalars (not static), so a new temperature
or top-p does not recompile the decode loop. Conventions (as in vLLM / HF):
- temperature == 0 is greedy; the reported log-prob is then the log-softmax of
  the unscaled logits (the delta distribution would always report 0);
- top_k == 0 and top_p == 1 disable the corresponding truncation;
- top-p applies to the top-k-renormalised distribution (HF and vLLM order);
- ties at the truncation threshold are kept (a threshold on logit values, as
  HF's TopKLogitsWarper).

No full sort: XLA:CPU's sort of the vocabulary cost more than the whole decode
step. The thresholds come from lax.top_k over CANDIDATES values when they lie
there (the usual case), else from an exact bisection over the float32 bit
patterns (32 compare-and-sum passes over [B, V]); both give the value a sort
would. Greedy decoding and "no truncation" skip all of it (lax.cond).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf
_BITS = 32
CANDIDATES = 64  # top values examined by the fast path (lax.top_k)


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys with the order of float32 x (total order, -inf lowest)."""
    i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    i = jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)  # negative floats: reverse their order
    return jax.lax.bitcast_convert_type(i, jnp.uint32) ^ jnp.uint32(0x80000000)


def _kth_largest_key(keys: jax.Array, k: jax.Array) -> jax.Array:
    """[B] the k-th largest key per row: max t with count(keys >= t) >= k."""
    lo, hi = keys.min(-1), keys.max(-1)

    def body(_, c):
        lo, hi = c
        mid = lo + ((hi - lo) - (hi - lo) // 2)  # ceil midpoint without uint32 overflow
        ok = jnp.sum(keys >= mid[:, None], axis=-1) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    return jax.lax.fori_loop(0, _BITS, body, (lo, hi))[0]


def _top_p_key(keys: jax.Array, probs: jax.Array, lo: jax.Array, p: jax.Array) -> jax.Array:
    """[B] min t >= lo with mass(keys > t) < p: the smallest kept value of the top-p prefix."""
    hi = keys.max(-1)

    def body(_, c):
        lo, hi = c
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(jnp.where(keys > mid[:, None], probs, 0.0), axis=-1) < p
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    return jax.lax.fori_loop(0, _BITS, body, (lo, hi))[1]


def _bisect_thresholds(scaled: jax.Array, top_p: jax.Array, k: jax.Array) -> jax.Array:
    """[B] threshold keys for any k and top_p (the general, slower path)."""
    keys = _order_keys(scaled)
    v = scaled.shape[-1]
    k_key = jax.lax.cond(k >= v, lambda keys, k: keys.min(-1), _kth_largest_key, keys, k)
    probs = jax.nn.softmax(jnp.where(keys >= k_key[:, None], scaled, NEG_INF), axis=-1)
    return jnp.where(top_p >= 1.0, k_key, _top_p_key(keys, probs, k_key, top_p))


def _truncate(scaled: jax.Array, top_p: jax.Array, k: jax.Array) -> jax.Array:
    """Mask tokens outside the top-k / top-p set with -inf.

    Fast path: the thresholds usually lie among the top CANDIDATES values
    (lax.top_k, a partial sort); only rows where the top-p prefix runs past
    them (a flat distribution with k > CANDIDATES) take the bisection.
    """
    v = scaled.shape[-1]
    c = min(v, CANDIDATES)
    vals = jax.lax.top_k(scaled, c)[0]                                   # [B, C] descending
    k_val = jnp.where(k <= c, vals[:, jnp.minimum(k, c) - 1], -jnp.inf)  # -inf: all V are in the top-k
    in_k = jnp.where(scaled >= k_val[:, None], scaled, NEG_INF)
    lse = jax.nn.logsumexp(in_k, axis=-1, keepdims=True)
    pc = jnp.where(vals >= k_val[:, None], jnp.exp(vals - lse), 0.0)
    mass_before = jnp.cumsum(pc, axis=-1) - pc
    keep = (mass_before < top_p) | (jnp.arange(c) == 0) | (top_p >= 1.0)
    keep &= vals >= k_val[:, None]
    thr = jnp.take_along_axis(vals, jnp.sum(keep, -1, keepdims=True) - 1, axis=-1)[:, 0]
    # Valid when the k-th value is known (k <= C, or k == V: no top-k) and the top-p
    # prefix ended inside the candidates (k <= C keeps it there by construction).
    ended = (k <= c) | (top_p >= 1.0) | (mass_before[:, -1] >= top_p) | (c == v)
    ok = ((k <= c) | (k >= v)) & ended
    thr = jnp.where(top_p >= 1.0, k_val, thr)
    thr_keys = jax.lax.cond(jnp.all(ok), lambda s, p, k: _order_keys(thr), _bisect_thresholds,
                            scaled, top_p, k)
    return jnp.where(_order_keys(scaled) >= thr_keys[:, None], scaled, NEG_INF)


def truncated_logprobs(logits: jax.Array, temperature: jax.Array | float,
                       top_p: jax.Array | float = 1.0, top_k: jax.Array | int = 0) -> jax.Array:
    """Log-probs [..., V] of softmax(logits / T) restricted to the top-k / top-p set.

    Excluded tokens get -inf. With temperature 0 the unscaled distribution is
    truncated the same way (only its argmax matters for greedy decoding).
    """
    logits = logits.astype(jnp.float32)
    shape, v = logits.shape, logits.shape[-1]
    t = jnp.asarray(temperature, jnp.float32)
    scaled = (logits / jnp.where(t > 0, t, 1.0)).reshape(-1, v)
    k = jnp.asarray(top_k, jnp.int32)
    k = jnp.where((k <= 0) | (k > v), v, k)
    p = jnp.asarray(top_p, jnp.float32)
    masked = jax.lax.cond((k >= v) & (p >= 1.0), lambda s, p, k: s, _truncate, scaled, p, k)
    return jax.nn.log_softmax(masked, axis=-1).reshape(shape)


def first_argmax(x: jax.Array) -> jax.Array:
    """argmax over the last axis (first index on ties), as int32.

    Why not jnp.argmax: XLA:CPU lowers it to a variadic (value, index) reduce
    that costs ~0.3 ms per [8, 8192] decode step; max + compare + min fuse.
    """
    v = x.shape[-1]
    hit = x == x.max(axis=-1, keepdims=True)
    idx = jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
    return jnp.minimum(idx, v - 1).astype(jnp.int32)  # an all-NaN row stays in range


def _inverse_cdf(uniform: jax.Array, probs: jax.Array) -> jax.Array:
    """One draw per row of `probs` [B, V] from one uniform [B] in [0, 1) (inverse CDF).

    Why not jax.random.categorical: its Gumbel trick draws and takes two logs of
    V uniforms per row, which costs more than the decode step's matmuls on CPU.
    """
    cdf = jnp.cumsum(probs, axis=-1)
    total = cdf[:, -1:]
    u = uniform.astype(jnp.float32)[:, None] * total
    u = jnp.minimum(u, jnp.nextafter(total, 0.0))  # u < total: the index below stays in range
    tok = jnp.sum(cdf <= u, axis=-1).astype(jnp.int32)
    # A zero-probability pick is only possible through float rounding in the scan.
    ok = jnp.take_along_axis(probs, tok[:, None], axis=-1)[:, 0] > 0
    return jax.lax.cond(jnp.all(ok), lambda t: t, lambda t: jnp.where(
        ok, t, first_argmax(probs)), tok)


def sample_tokens(key: jax.Array, logits: jax.Array, temperature: jax.Array | float,
                  top_p: jax.Array | float = 1.0,
                  top_k: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """Sample one token per row of `logits` [B, V]; returns (tokens [B] int32, logprobs [B] f32).

    The log-prob is that of the chosen token under the temperature-scaled,
    truncated distribution (unscaled log-softmax when greedy, see module doc).
    """
    uniform = jax.random.uniform(key, logits.shape[:1], jnp.float32)
    return sample_with_uniform(uniform, logits, temperature, top_p, top_k)


def sample_with_uniform(uniform: jax.Array, logits: jax.Array, temperature: jax.Array | float,
                        top_p: jax.Array | float = 1.0,
                        top_k: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """sample_tokens with the per-row uniforms [B] given: the decode loop draws all of
    them before it starts, so no PRNG runs inside the loop. Greedy skips the rest (lax.cond)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.asarray(temperature, jnp.float32) <= 0

    def pick_greedy(_):
        return first_argmax(logits), jax.nn.log_softmax(logits, axis=-1)

    def pick_sampled(_):
        lp = truncated_logprobs(logits, temperature, top_p, top_k)
        return _inverse_cdf(uniform, jnp.exp(lp)), lp

    tokens, lp = jax.lax.cond(greedy, pick_greedy, pick_sampled, None)
    return tokens, jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]


def is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    """Boolean [B]: the token is one of the EOS ids."""
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))

"""Dense and top-k generalized JSD with the vocabulary split over the "tensor" mesh axis.

Inside jax.shard_map each shard holds [..., V/n] logits: it takes its local max
(stop_gradient'ed: pmax has no differentiation rule and the shift cancels),
lax.pmax, local sum-exp, lax.psum, and psums the per-token terms. Top-k ids are
gathered only on the shard that owns them (then psum'ed). The vocab axis is
never all-gathered. A vocab that the axis does not divide is zero-padded and
the padding masked out of every sum; `vocab_size` also masks an embedding's own
padding rows (Qwen: 152064 logits for 151936 tokens).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from gold_jax.losses import validation as val
from gold_jax.losses.core import NEG_FLOOR, compute_dtype, jsd_terms, reduce_tokens, scaled_logits, topk_token_terms
from gold_jax.losses.topk import topk_mask
from gold_jax.sharding.rules import BATCH_AXES


def _parallel_normalizer(x: jax.Array, keep: jax.Array, axis: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`masked_normalizer` over a last axis sharded on `axis`: (m, log_sum, any_kept).

    Callers form (x - m) - log_sum, never x - (m + log_sum), which would round
    logits of 1e4 to ~1e-3. Where nothing is kept m = log_sum = 0.
    """
    any_kept = lax.psum(jnp.sum(keep, axis=-1, dtype=jnp.int32), axis) > 0
    m = lax.pmax(lax.stop_gradient(jnp.max(jnp.where(keep, x, -jnp.inf), axis=-1)), axis)
    m = jnp.where(any_kept, m, 0.0)
    s = lax.psum(jnp.sum(jnp.exp(jnp.where(keep, x - m[..., None], -jnp.inf)), axis=-1), axis)  # see core
    return m, jnp.log(jnp.where(any_kept, s, 1.0)), any_kept


def _local_valid(n_local: int, vocab_size: int, axis: str) -> tuple[jax.Array, jax.Array]:
    offset = lax.axis_index(axis) * n_local
    return offset, (offset + jnp.arange(n_local)) < vocab_size


def _specs(mesh: Mesh, shape: Sequence[int], batch_axes: Sequence[str], axis: str):
    """(spec of [..., V] logits, spec of [..., k] / [...] per-token arrays) for the batch dim 0."""
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis!r} (axes: {tuple(mesh.shape)})")
    baxes = tuple(a for a in batch_axes if a in mesh.shape and mesh.shape[a] > 1)
    if not baxes or shape[0] % math.prod(mesh.shape[a] for a in baxes):
        baxes = None
    elif len(baxes) == 1:
        baxes = baxes[0]
    mid = [None] * (len(shape) - 2)
    return P(baxes, *mid, axis), P(baxes, *mid, None), P(baxes, *mid)


def _prepare(logits: jax.Array, mesh: Mesh, axis: str, vocab_size: int | None):
    if logits.ndim < 2:
        raise ValueError(f"student_logits must be [batch, ..., V] (ndim >= 2), got shape {logits.shape}")
    vocab_size = val.check_vocab_size(vocab_size, logits.shape[-1])
    n = mesh.shape[axis] if axis in mesh.shape else 1
    pad = -logits.shape[-1] % n
    return vocab_size, pad


def _pad(x: jax.Array, pad: int) -> jax.Array:
    return x if pad == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def vocab_parallel_jsd(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array, *,
                       mesh: Mesh, beta: float = 0.5, temperature: float = 1.0,
                       reduction: str = "batchmean", vocab_size: int | None = None,
                       batch_axes: Sequence[str] = BATCH_AXES, axis: str = "tensor") -> jax.Array:
    """`generalized_jsd` with the vocab axis sharded over `axis`; same arguments plus `mesh`."""
    beta, temperature = val.check_beta(beta), val.check_temperature(temperature)
    val.check_reduction(reduction)
    val.check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
    val.check_mask(mask, student_logits.shape[:-1])
    vocab_size, pad = _prepare(student_logits, mesh, axis, vocab_size)
    v_spec, _, t_spec = _specs(mesh, student_logits.shape, batch_axes, axis)
    dt = compute_dtype(student_logits, teacher_logits)

    def local(s, t):
        s, t = scaled_logits(s, temperature, dt), scaled_logits(t, temperature, dt)
        _, valid = _local_valid(s.shape[-1], vocab_size, axis)
        keep = jnp.broadcast_to(valid, s.shape)
        (ms, ls, _), (mt, lt, _) = _parallel_normalizer(s, keep, axis), _parallel_normalizer(t, keep, axis)
        logq = jnp.where(keep, (s - ms[..., None]) - ls[..., None], 0.0)
        logp = jnp.where(keep, (t - mt[..., None]) - lt[..., None], 0.0)
        return lax.psum(jnp.sum(jsd_terms(logp, logq, beta, valid=keep), axis=-1), axis)

    per_token = jax.shard_map(local, mesh=mesh, in_specs=(v_spec, v_spec), out_specs=t_spec)(
        _pad(student_logits, pad), _pad(teacher_logits, pad))
    return reduce_tokens(per_token, mask, reduction, vocab_size)


def vocab_parallel_topk_jsd(student_logits: jax.Array, teacher_logprobs: jax.Array, teacher_ids: jax.Array,
                            mask: jax.Array, *, mesh: Mesh, beta: float = 0.5, temperature: float = 1.0,
                            reduction: str = "batchmean", mode: str = "tail",
                            teacher_logmass: jax.Array | None = None, vocab_size: int | None = None,
                            batch_axes: Sequence[str] = BATCH_AXES, axis: str = "tensor") -> jax.Array:
    """`topk_jsd` with the vocab axis sharded over `axis`; same arguments plus `mesh`."""
    beta, temperature = val.check_beta(beta), val.check_temperature(temperature)
    val.check_reduction(reduction)
    mode = val.check_mode(mode)
    vocab_size, pad = _prepare(student_logits, mesh, axis, vocab_size)
    val.check_topk(student_logits.shape, teacher_logprobs, teacher_ids, mask, teacher_logmass, vocab_size)
    v_spec, k_spec, t_spec = _specs(mesh, student_logits.shape, batch_axes, axis)
    dt = compute_dtype(student_logits, teacher_logprobs)
    has_mass = teacher_logmass is not None

    def local(s, lt, ids, *logmass):
        s = scaled_logits(s, temperature, dt)
        lt = jnp.maximum(lt.astype(dt), NEG_FLOOR)
        n_local = s.shape[-1]
        offset, valid = _local_valid(n_local, vocab_size, axis)
        ids = jnp.clip(ids.astype(jnp.int32), 0, vocab_size - 1)
        owned = (ids >= offset) & (ids < offset + n_local)
        s_k = jnp.take_along_axis(s, jnp.clip(ids - offset, 0, n_local - 1), axis=-1)
        s_k = lax.psum(jnp.where(owned, s_k, 0.0), axis)
        if mode == "renormalize":  # any common shift of the student logits at the ids will do
            return topk_token_terms(s_k, None, None, lt, None, beta, mode)
        m, log_sum, _ = _parallel_normalizer(s, jnp.broadcast_to(valid, s.shape), axis)
        rest = ~topk_mask(ids, n_local, offset) & valid
        tail_m, tail_log_sum, has_tail = _parallel_normalizer(s, rest, axis)
        logq_k = (s_k - m[..., None]) - log_sum[..., None]
        logq_tail = (tail_m - m) + (tail_log_sum - log_sum)
        lm = logmass[0].astype(dt) if logmass else None
        return topk_token_terms(logq_k, logq_tail, has_tail, lt, lm, beta, mode)

    args = (_pad(student_logits, pad), teacher_logprobs, teacher_ids) + ((teacher_logmass,) if has_mass else ())
    specs = (v_spec, k_spec, k_spec) + ((t_spec,) if has_mass else ())
    per_token = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=t_spec)(*args)
    return reduce_tokens(per_token, mask, reduction, vocab_size)

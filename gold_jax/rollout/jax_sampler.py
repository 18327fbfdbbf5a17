"""Embedded JAX rollout engine: jit prefill + lax.while_loop decode over a KV cache.

One compile per (batch, prompt bucket, max_new_tokens): temperature, top-p,
top-k and the seed are traced scalars, so changing them never recompiles. The
loop stops as soon as every row has emitted EOS; R stays fixed so that the
output shape (and the trainer's step) does not depend on when that happens.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gold_jax.models.kv_cache import KV_CACHE_AXES
from gold_jax.rollout import per_host
from gold_jax.rollout.base import finish_result, normalize_eos, validate_request
from gold_jax.rollout.sampling import is_eos, sample_with_uniform
from gold_jax.sharding.rules import BATCH_AXES, logical_to_sharding
from gold_jax.types import RolloutResult


def _decode(model: nnx.Module, prompt_ids: jax.Array, prompt_mask: jax.Array, seed: jax.Array,
            temperature: jax.Array, top_p: jax.Array, top_k: jax.Array, row0: jax.Array | int = 0, *,
            max_new_tokens: int,
            eos_ids: tuple[int, ...], pad_id: int, mesh: Mesh | None = None):
    """Prefill the prompt, then sample up to R tokens; returns (ids, mask, logprobs) [B, R]."""
    b, p = prompt_ids.shape
    r = max_new_tokens
    key = jax.random.key(seed)
    mask = prompt_mask.astype(jnp.int32)
    cache = model.init_cache(b, p + r)
    if mesh is not None:  # batch over data+fsdp, kv heads over tensor, like the activations
        cache = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            x, logical_to_sharding(mesh, KV_CACHE_AXES, shape=x.shape)), cache)
    kv_mask = jnp.pad(mask, ((0, 0), (0, r)))
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = model.forward_with_cache(prompt_ids, positions, cache, jnp.int32(0), kv_mask)
    # Left padding puts every row's last real token in column P - 1.
    # Every step's uniforms up front: no PRNG work inside the decode loop. Row i draws from
    # fold_in(key, row0 + i), its index in the global batch, so its tokens depend neither on how
    # many rows the batch was padded to nor on which process samples it (per-host rollout).
    row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(row0 + jnp.arange(b, dtype=jnp.int32))
    uniforms = jax.vmap(lambda k: jax.random.uniform(k, (r,), jnp.float32))(row_keys)
    tok, lp = sample_with_uniform(uniforms[:, 0], logits[:, -1], temperature, top_p, top_k)
    n_prompt = mask.sum(axis=1)
    out_ids = jnp.full((b, r), pad_id, jnp.int32).at[:, 0].set(tok)
    out_lp = jnp.zeros((b, r), jnp.float32).at[:, 0].set(lp)
    out_mask = jnp.zeros((b, r), jnp.int32).at[:, 0].set(1)
    done = is_eos(tok, eos_ids)

    def cond(c):
        i, _, done, *_ = c
        return (i < r) & ~jnp.all(done)

    def body(c):
        i, tok, done, out_ids, out_lp, out_mask, cache, kv_mask = c
        slot = p + i - 1  # the cache slot of the token sampled at step i - 1
        kv_mask = jax.lax.dynamic_update_slice(kv_mask, jnp.ones((b, 1), jnp.int32), (0, slot))
        pos = (n_prompt + i - 1)[:, None]
        logits, cache = model.forward_with_cache(tok[:, None], pos, cache, slot, kv_mask)
        u = jax.lax.dynamic_index_in_dim(uniforms, i, axis=1, keepdims=False)
        new, lp = sample_with_uniform(u, logits[:, 0], temperature, top_p, top_k)
        live = ~done
        col = lambda x, v: jax.lax.dynamic_update_slice(x, v[:, None], (0, i))  # noqa: E731
        out_ids = col(out_ids, jnp.where(live, new, pad_id).astype(jnp.int32))
        out_lp = col(out_lp, jnp.where(live, lp, 0.0))
        out_mask = col(out_mask, live.astype(jnp.int32))
        done = done | is_eos(new, eos_ids)
        return i + 1, new, done, out_ids, out_lp, out_mask, cache, kv_mask

    carry = (jnp.int32(1), tok, done, out_ids, out_lp, out_mask, cache, kv_mask)
    _, _, _, out_ids, out_lp, out_mask, _, _ = jax.lax.while_loop(cond, body, carry)
    return out_ids, out_mask, out_lp


class JaxSampler:
    """RolloutEngine backed by the NNX decoder's KV-cache path, sharded on `mesh`.

    `mesh` is the rollout device subset: batch over ("data", "fsdp"), parameters
    by the logical-axis rules. Without a mesh the parameters stay where they are.
    A mesh spanning several processes (a multi-host run sharing the training devices)
    is replaced by this process's block of it (gold_jax.rollout.per_host): each host
    samples its own rows, and `sync_weights` gathers the student to every host's devices.
    Prompts are left-padded up to a multiple of `prompt_bucket` columns (extra
    padding changes no token or log-prob), so arbitrary prompt lengths (e.g.
    the teacher's generate op) compile once per bucket. `max_prompt_buckets`
    bounds the number of distinct compiled shapes; a new shape beyond it is an
    error rather than a silent recompile.
    """

    def __init__(self, model: nnx.Module, *, eos_id: int | Sequence[int], pad_id: int,
                 mesh: Mesh | None = None, max_prompt_buckets: int | None = None,
                 prompt_bucket: int = 16):
        if not isinstance(model, nnx.Module):
            raise TypeError(f"model must be a flax.nnx Module, got {type(model).__name__}")
        if not isinstance(pad_id, (int, np.integer)) or pad_id < 0:
            raise ValueError(f"pad_id must be a non-negative int, got {pad_id!r}")
        if max_prompt_buckets is not None and max_prompt_buckets < 1:
            raise ValueError(f"max_prompt_buckets must be >= 1 or None, got {max_prompt_buckets!r}")
        if not isinstance(prompt_bucket, (int, np.integer)) or prompt_bucket < 1:
            raise ValueError(f"prompt_bucket must be a positive int, got {prompt_bucket!r}")
        self.prompt_bucket = int(prompt_bucket)
        self._local_copy = None
        if mesh is not None and per_host.is_multi_process(mesh):
            self._local_copy = per_host.LocalCopy(mesh)
            mesh = self._local_copy.local
        self.eos_ids = normalize_eos(eos_id)
        self.pad_id = int(pad_id)
        self.mesh = mesh
        self.max_prompt_buckets = max_prompt_buckets
        self.vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        self._graphdef, state = nnx.split(model)
        self._shardings = self._state_shardings(model)
        self._state = self._put(state)
        self._shapes: set[tuple[int, int, int]] = set()
        graphdef = self._graphdef

        def run(state, ids, mask, seed, t, tp, tk, row0, *, max_new_tokens, eos_ids, pad_id):
            model = nnx.merge(graphdef, state)
            return _decode(model, ids, mask, seed, t, tp, tk, row0, max_new_tokens=max_new_tokens,
                           eos_ids=eos_ids, pad_id=pad_id, mesh=mesh)

        self._run = jax.jit(run, static_argnames=("max_new_tokens", "eos_ids", "pad_id"))

    # -- weights ---------------------------------------------------------------------------
    def _state_shardings(self, model: nnx.Module):
        if self.mesh is None:
            return None
        from gold_jax.models.partition import state_shardings
        return state_shardings(model, self.mesh)

    def _put(self, state):
        if self._local_copy is not None and per_host.needs_local_copy(state):
            state = self._local_copy(state)   # a collective over the training mesh (module doc of per_host)
        if self._shardings is None:
            return state
        return jax.tree.map(jax.device_put, state, self._shardings)

    def sync_weights(self, model_or_state: Any) -> float:
        """Reshard the trainer's parameters onto the rollout shardings (device to device)."""
        t0 = time.perf_counter()
        if isinstance(model_or_state, nnx.Module):
            state = nnx.state(model_or_state)
        elif isinstance(model_or_state, nnx.State):
            state = model_or_state
        else:
            raise TypeError("sync_weights expects a flax.nnx Module or nnx.State, "
                            f"got {type(model_or_state).__name__}")
        old, new = jax.tree.structure(self._state), jax.tree.structure(state)
        if old != new:
            raise ValueError(f"sync_weights: state tree does not match the sampler's ({new} vs {old})")
        for a, b in zip(jax.tree.leaves(self._state), jax.tree.leaves(state)):
            if a.shape != b.shape:
                raise ValueError(f"sync_weights: parameter shape {b.shape} != expected {a.shape}")
        self._state = jax.block_until_ready(self._put(state))
        return time.perf_counter() - t0

    # -- generation ------------------------------------------------------------------------
    @property
    def compiled_shapes(self) -> frozenset[tuple[int, int, int]]:
        """The (batch, bucketed prompt length, max_new_tokens) shapes compiled so far."""
        return frozenset(self._shapes)

    def _batch_multiple(self) -> int:
        if self.mesh is None:
            return 1
        return int(np.prod([self.mesh.shape[a] for a in BATCH_AXES if a in self.mesh.shape]))

    def generate(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray, *, n: int = 1,
                 max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
                 seed: int, row_offset: int = 0) -> RolloutResult:
        """row_offset: the global batch index of prompt 0 (per-host rollout), so that a row's
        samples do not depend on which process draws them."""
        if not isinstance(row_offset, (int, np.integer)) or row_offset < 0:
            raise ValueError(f"row_offset must be an int >= 0, got {row_offset!r}")
        ids, mask = validate_request(prompt_ids, prompt_mask, n=n, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, top_k=top_k,
                                     vocab_size=self.vocab_size)
        ids, mask = np.repeat(ids, n, axis=0), np.repeat(mask, n, axis=0)
        rows, p = ids.shape
        cols = -(-p // self.prompt_bucket) * self.prompt_bucket - p  # left padding up to the bucket
        run_ids = np.pad(ids, ((0, 0), (cols, 0)), constant_values=self.pad_id) if cols else ids
        run_mask = np.pad(mask, ((0, 0), (cols, 0))) if cols else mask
        # Pad the batch to a multiple of the batch shards (copies of row 0, dropped after).
        mult = self._batch_multiple()
        extra = (-rows) % mult
        if extra:
            run_ids = np.concatenate([run_ids, np.repeat(run_ids[:1], extra, 0)])
            run_mask = np.concatenate([run_mask, np.repeat(run_mask[:1], extra, 0)])
        shape = (run_ids.shape[0], run_ids.shape[1], int(max_new_tokens))
        if shape not in self._shapes:
            if self.max_prompt_buckets is not None and len(self._shapes) >= self.max_prompt_buckets:
                raise ValueError(
                    f"generate: new shape (batch, prompt_len, max_new_tokens)={shape} would exceed "
                    f"max_prompt_buckets={self.max_prompt_buckets} (compiled: {sorted(self._shapes)}); "
                    "bucket prompt lengths in the data pipeline")
            self._shapes.add(shape)
        if self.mesh is not None:
            bs = NamedSharding(self.mesh, P(tuple(a for a in BATCH_AXES if a in self.mesh.shape)))
            run_ids, run_mask = jax.device_put((run_ids, run_mask), bs)
        out = self._run(self._state, run_ids, run_mask, jnp.uint32(seed % 2**32),
                        jnp.float32(temperature), jnp.float32(top_p), jnp.int32(top_k),
                        jnp.int32(int(row_offset) * n), max_new_tokens=int(max_new_tokens), eos_ids=self.eos_ids, pad_id=self.pad_id)
        c_ids, c_mask, c_lp = (np.asarray(x)[:rows] for x in out)
        return finish_result(ids, mask, c_ids, c_mask, c_lp, self.eos_ids, self.pad_id)

    def close(self) -> None:
        self._state = None

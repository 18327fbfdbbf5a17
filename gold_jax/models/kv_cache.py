"""KV cache pytree shared by the rollout sampler and the teacher backend."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """Stacked per-layer keys and values, [num_layers, B, S, num_kv_heads, head_dim].

    The cache holds no mask or index: the caller (sampler) owns `kv_mask` [B,S]
    and the write position `cache_index`, which keeps this a plain array pytree
    that flows through jit, lax.scan and lax.while_loop.
    """
    k: jax.Array
    v: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @classmethod
    def zeros(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
              dtype=jnp.float32) -> "KVCache":
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


# Logical axes of the cache arrays, for callers that shard it (batch over data+fsdp).
KV_CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")

"""Decoder: the Llama / Qwen2 / Qwen3 causal LM as a Flax NNX module.

Two entry points share the layers: `__call__`/`hidden` (full sequence, training
and scoring) and `forward_with_cache` (prefill + decode for the sampler and the
teacher backend). Both build the same mask (causal AND key padding), so cached
decoding reproduces the full forward.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gold_jax.models.config import ModelConfig
from gold_jax.models.kv_cache import KVCache
from gold_jax.models.layers import RESIDUAL, DecoderLayer, RMSNorm, dense, param
from gold_jax.sharding.activations import constrain

_REMAT_POLICY = {
    "full": None,  # save nothing: recompute the whole layer on the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """cumsum(mask) - 1 clipped at 0: a left-padded prompt starts at position 0."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _check_2d(name: str, x) -> None:
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"{name} must be [batch, length], got shape {getattr(x, 'shape', None)}")


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
        self.config = cfg
        pd = cfg.param_dtype
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)

    # ---- full-sequence path -------------------------------------------------
    def _embed(self, input_ids: jax.Array) -> jax.Array:
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.config.dtype)
        ad = getattr(self, "embed_lora", None)   # LoRA (models/lora.py)
        return constrain(x if ad is None else x + ad.rows(input_ids, x.dtype), RESIDUAL)

    def hidden(self, input_ids: jax.Array, attention_mask: jax.Array,
               positions: jax.Array | None = None) -> jax.Array:
        """Final-normed hidden states [B,L,H] in the compute dtype."""
        _check_2d("input_ids", input_ids)
        _check_2d("attention_mask", attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape "
                             f"{input_ids.shape}")
        if positions is None:
            positions = default_positions(attention_mask)
        length = input_ids.shape[1]
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        mask = causal[None] & (attention_mask[:, None, :] != 0)
        x = self._embed(input_ids)
        for layer in self.layers:
            if self.config.remat == "none":
                x = layer(x, positions, mask)
            else:
                policy = _REMAT_POLICY[self.config.remat]
                x = nnx.remat(lambda lyr, h, p, m: lyr(h, p, m), policy=policy)(layer, x, positions, mask)
        return constrain(self.norm(x), RESIDUAL)

    def lm_head_weight(self) -> jax.Array:
        """[H, V] output projection (the transposed embedding when tied), LoRA updates folded in."""
        if self.config.tie_word_embeddings:
            ad = getattr(self, "embed_lora", None)   # a tied head is the adapted embedding (= the merged model)
            w = self.embed_tokens[...]
            return w.T if ad is None else (w.astype(jnp.float32) + ad.delta()).T
        ad = getattr(self, "lm_head_lora", None)
        return self.lm_head[...] if ad is None else self.lm_head[...].astype(jnp.float32) + ad.delta()

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        return dense(h, self.lm_head_weight().astype(h.dtype), out_dtype=jnp.float32)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 positions: jax.Array | None = None) -> jax.Array:
        """Logits [B,L,V] float32."""
        return self.logits_from_hidden(self.hidden(input_ids, attention_mask, positions))

    # ---- cached path ----------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        cfg = self.config
        return KVCache.zeros(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim,
                             dtype=dtype or cfg.dtype)

    def forward_with_cache(self, input_ids: jax.Array, positions: jax.Array, cache: KVCache,
                           cache_index, kv_mask: jax.Array) -> tuple[jax.Array, KVCache]:
        """T new tokens against the cache: writes slots [cache_index, cache_index+T).

        The query in slot cache_index+t sees slots j <= cache_index+t with
        kv_mask[b, j] == 1. Returns (logits [B,T,V] float32, new cache).
        """
        _check_2d("input_ids", input_ids)
        _check_2d("positions", positions)
        _check_2d("kv_mask", kv_mask)
        b, t = input_ids.shape
        s = cache.k.shape[2]
        if positions.shape != (b, t):
            raise ValueError(f"positions shape {positions.shape} != input_ids shape {(b, t)}")
        if kv_mask.shape != (b, s):
            raise ValueError(f"kv_mask shape {kv_mask.shape} != (batch, cache max_len) {(b, s)}")
        if cache.k.shape[1] != b:
            raise ValueError(f"cache batch {cache.k.shape[1]} != input batch {b}")
        cache_index = jnp.asarray(cache_index, jnp.int32)
        q_slot = cache_index + jnp.arange(t, dtype=jnp.int32)
        causal = jnp.arange(s, dtype=jnp.int32)[None, :] <= q_slot[:, None]
        mask = causal[None] & (kv_mask[:, None, :] != 0)
        x = self._embed(input_ids)
        k_cache, v_cache = cache.k, cache.v
        for i, layer in enumerate(self.layers):
            x, k_cache, v_cache = layer.cached(x, positions, k_cache, v_cache, i, cache_index, mask)
        logits = self.logits_from_hidden(self.norm(x))
        return logits, KVCache(k=k_cache, v=v_cache)

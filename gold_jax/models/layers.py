"""Building blocks: RMSNorm, rotary embeddings, GQA attention, SwiGLU MLP, decoder layer.

Parameters are stored in `param_dtype` and cast to the compute dtype at use;
norms, rotary tables and the softmax run in float32 (bf16 softmax loses the tail
that distillation losses care about).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gold_jax.models.config import ModelConfig
from gold_jax.sharding.activations import constrain

# Logical axes of the activations (sharding/rules.py); pinned only under sharding.activation_mesh.
RESIDUAL = ("batch", "length", "act_embed")

# Finite rather than -inf: a fully masked row (a left-pad query) gets a uniform
# softmax instead of NaN, so padding never poisons gradients.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def param(rngs: nnx.Rngs | None, shape, names, dtype, init: str = "normal", std: float = 0.02):
    """nnx.Param carrying logical axis names (sharding/rules.py) in `out_sharding`."""
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    # eager_sharding=False: names are logical; partition.shard_model maps them to a mesh.
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense(x: jax.Array, w: jax.Array, n_in: int, out_dtype) -> jax.Array:
    lead = x.ndim - n_in
    dims = ((tuple(range(lead, x.ndim)), tuple(range(n_in))), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=out_dtype)


def _dense_fwd(x, w, n_in, out_dtype):
    return _dense(x, w, n_in, out_dtype), (x, w)


def _dense_bwd(n_in, out_dtype, res, g):
    x, w = res
    lead, n_out = x.ndim - n_in, w.ndim - n_in
    g = g.astype(x.dtype)
    # dx = g . w^T over the output dims; dw = x^T . g over the token dims, written
    # in the orientation XLA:CPU runs without transposing g (see `dense`).
    dx = jax.lax.dot_general(g, w, ((tuple(range(lead, lead + n_out)), tuple(range(n_in, w.ndim))),
                                    ((), ())))
    dw = jax.lax.dot_general(x, g, ((tuple(range(lead)), tuple(range(lead))), ((), ())))
    return dx.astype(x.dtype), dw.astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, out_dtype=None) -> jax.Array:
    """x [..., *w.shape[:n_in]] contracted with w -> [..., *w.shape[n_in:]].

    Why a hand-written VJP: JAX transposes a dot into dot(g, x) followed by a
    transpose, and XLA:CPU then materialises g transposed; for the LM head that
    is the whole [tokens, vocab] logits gradient (about a fifth of the step on
    CPU). Here the weight gradient is x^T g over the token axes, which XLA runs
    in place. Same values as autodiff of jnp.einsum (tests/test_models.py).
    """
    if x.shape[x.ndim - n_in:] != w.shape[:n_in]:
        raise ValueError(f"dense: input dims {x.shape} do not match weight {w.shape} (n_in={n_in})")
    return _dense(x, w, n_in, None if out_dtype is None else jnp.dtype(out_dtype))


def adapted(module: nnx.Module, name: str, x: jax.Array, y: jax.Array, n_in: int = 1) -> jax.Array:
    """y plus the LoRA adapter `<name>_lora` of `module` on input x, when one is attached (models/lora.py)."""
    ad = getattr(module, f"{name}_lora", None)
    if ad is None:
        return y
    flat = x.reshape(*x.shape[:x.ndim - n_in], -1)
    return y + ad(flat).reshape(y.shape).astype(y.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * xf).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.weight = param(None, (dim,), ("norm",), param_dtype, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


@functools.lru_cache(maxsize=64)
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim/2] float32, with Llama 3 scaling when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    inv = inv.astype(np.float32)
    if cfg.rope_type == "llama3":
        s = cfg.rope_scaling
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_len = float(s["original_max_position_embeddings"])
        lo_wavelen, hi_wavelen = old_len / lo, old_len / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half rotary embedding (HF convention). x [B,T,N,D], positions [B,T]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rot * sin).astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention. q [B,T,N,D], k/v [B,S,KV,D], mask [B,T,S] bool -> [B,T,N,D]."""
    b, t, n, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(d))
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, n, d)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        h, n, kv, d, pd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype
        self.cfg = cfg
        self.q_proj = param(rngs, (h, n, d), ("embed", "heads", "head_dim"), pd)
        self.k_proj = param(rngs, (h, kv, d), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = param(rngs, (h, kv, d), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = param(rngs, (n, d, h), ("heads", "head_dim", "embed"), pd)
        if cfg.attention_bias:
            self.q_bias = param(None, (n, d), ("heads", "head_dim"), pd, init="zeros")
            self.k_bias = param(None, (kv, d), ("kv_heads", "head_dim"), pd, init="zeros")
            self.v_bias = param(None, (kv, d), ("kv_heads", "head_dim"), pd, init="zeros")
            if cfg.architecture != "qwen2":  # HF Qwen2 has no o_proj bias
                self.o_bias = param(None, (h,), ("embed",), pd, init="zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, pd)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, pd)

    def qkv(self, x: jax.Array, positions: jax.Array):
        cd = x.dtype
        q = constrain(dense(x, self.q_proj[...].astype(cd)), ("batch", "length", "act_heads", "head_dim"))
        # k and v stacked on a new unsharded axis: one matmul, same sharding as each.
        kv_w = jnp.stack([self.k_proj[...], self.v_proj[...]], axis=1).astype(cd)
        kv = constrain(dense(x, kv_w), ("batch", "length", None, "act_kv_heads", "head_dim"))
        k, v = kv[:, :, 0], kv[:, :, 1]
        q, k, v = adapted(self, "q", x, q), adapted(self, "k", x, k), adapted(self, "v", x, v)
        if self.cfg.attention_bias:
            q = q + self.q_bias[...].astype(cd)
            k = k + self.k_bias[...].astype(cd)
            v = v + self.v_bias[...].astype(cd)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_inv_freq(self.cfg)  # numpy constant folded into the trace
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def out(self, o: jax.Array) -> jax.Array:
        o = constrain(o, ("batch", "length", "act_heads", "head_dim"))
        y = adapted(self, "o", o, dense(o, self.o_proj[...].astype(o.dtype), n_in=2), n_in=2)
        if self.cfg.attention_bias and self.cfg.architecture != "qwen2":
            y = y + self.o_bias[...].astype(o.dtype)
        return y


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        h, i, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
        self.gate_proj = param(rngs, (h, i), ("embed", "mlp"), pd)
        self.up_proj = param(rngs, (h, i), ("embed", "mlp"), pd)
        self.down_proj = param(rngs, (i, h), ("mlp", "embed"), pd)

    def __call__(self, x: jax.Array) -> jax.Array:
        cd = x.dtype
        # gate and up stacked on a new unsharded axis: one [H, 2, I] matmul.
        gu = dense(x, jnp.stack([self.gate_proj[...], self.up_proj[...]], axis=1).astype(cd))
        gu = constrain(gu, ("batch", "length", None, "act_mlp"))
        g, u = adapted(self, "gate", x, gu[..., 0, :]), adapted(self, "up", x, gu[..., 1, :])
        mid = constrain(jax.nn.silu(g) * u, ("batch", "length", "act_mlp"))
        return adapted(self, "down", mid, dense(mid, self.down_proj[...].astype(cd)))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """Full-sequence layer: mask [B,L,L] bool (causal AND key padding)."""
        x = constrain(x, RESIDUAL)
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), positions)
        x = constrain(x + self.self_attn.out(attend(q, k, v, mask)), RESIDUAL)
        return constrain(x + self.mlp(self.post_attention_layernorm(x)), RESIDUAL)

    def cached(self, x, positions, k_cache, v_cache, layer: int, cache_index, mask):
        """One layer on T new tokens against the stacked cache [layers,B,S,KV,D]; returns new caches."""
        x = constrain(x, RESIDUAL)
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), positions)
        start = (layer, 0, cache_index, 0, 0)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype)[None], start)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype)[None], start)
        ks, vs = k_cache[layer].astype(x.dtype), v_cache[layer].astype(x.dtype)
        x = constrain(x + self.self_attn.out(attend(q, ks, vs, mask)), RESIDUAL)
        return constrain(x + self.mlp(self.post_attention_layernorm(x)), RESIDUAL), k_cache, v_cache

"""Width pruning of a decoder (Minitron-style), for the chain demo's student.

Why: in real distillation the student usually shares a base with the teacher
(same family, pre-trained on the same data) or is carved out of it (NVIDIA
Minitron prunes a teacher's heads and MLP neurons, then distils). The chain
task's student is built that way: the teacher's attention heads and MLP
neurons ranked by their activations on calibration text, the weakest removed,
then a short warm-up. Training a small student from scratch on the chain task
takes far longer than the demo's build budget (it had not left chance level
after 500 SFT steps), and a student carved from the teacher keeps some of the
teacher's circuits while losing capacity: it makes its own mistakes.

Importance (Minitron, activation-based): a head's score is the mean norm of
its output after o_proj, a neuron's the mean |silu(gate) * up| times the norm
of its down_proj row, both over the calibration tokens that are not padding.
"""
from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gold_jax.models import Decoder, default_positions, init_model
from gold_jax.models.layers import attend


def importance(model: Decoder, input_ids: np.ndarray, attention_mask: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Per layer: {"heads": [num_heads], "neurons": [intermediate]} activation importance scores."""
    _check_supported(model.config)
    return [{k: np.asarray(v) for k, v in layer.items()}
            for layer in _importance(model, jnp.asarray(input_ids), jnp.asarray(attention_mask))]


def _check_supported(cfg) -> None:
    if cfg.num_kv_heads != cfg.num_heads or cfg.attention_bias:
        raise ValueError("prune supports models without GQA or attention biases (the demo's models)")


@nnx.jit
def _importance(model: Decoder, ids: jax.Array, mask: jax.Array) -> list[dict[str, jax.Array]]:
    positions = default_positions(mask)
    length = ids.shape[1]
    full_mask = jnp.tril(jnp.ones((length, length), bool))[None] & (mask[:, None, :] != 0)
    weight = mask.astype(jnp.float32) / jnp.maximum(mask.sum(), 1)       # mean over real tokens
    x = model._embed(ids)
    out = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        q, k, v = attn.qkv(layer.input_layernorm(x), positions)
        o = attend(q, k, v, full_mask)                                  # [B, L, N, D]
        per_head = jnp.einsum("blnd,ndh->blnh", o, attn.o_proj[...])    # each head's share of o_proj
        heads = jnp.einsum("bln,bl->n", jnp.linalg.norm(per_head, axis=-1), weight)
        x = x + per_head.sum(2)
        h = layer.post_attention_layernorm(x)
        mid = jax.nn.silu(h @ mlp.gate_proj[...]) * (h @ mlp.up_proj[...])
        neurons = jnp.einsum("bli,bl->i", jnp.abs(mid), weight) * jnp.linalg.norm(mlp.down_proj[...], axis=1)
        x = x + mid @ mlp.down_proj[...]
        out.append({"heads": heads, "neurons": neurons})
    return out


def prune(model: Decoder, scores: list[dict[str, np.ndarray]], *, num_heads: int, intermediate: int,
          seed: int = 0) -> Decoder:
    """A new model with the top-`num_heads` heads and top-`intermediate` neurons of every layer.

    Embeddings, norms and the remaining weights are copied unchanged, so the
    pruned model computes the same function as the original with the removed
    heads' and neurons' outputs set to zero.
    """
    cfg = model.config
    _check_supported(cfg)
    if not 1 <= num_heads <= cfg.num_heads or not 1 <= intermediate <= cfg.intermediate_size:
        raise ValueError(f"num_heads={num_heads}, intermediate={intermediate}: need 1..{cfg.num_heads} "
                         f"and 1..{cfg.intermediate_size}")
    if len(scores) != cfg.num_layers:
        raise ValueError(f"{len(scores)} layers of scores for a model of {cfg.num_layers}")
    small = init_model(dataclasses.replace(cfg, num_heads=num_heads, num_kv_heads=num_heads,
                                           intermediate_size=intermediate), seed=seed)
    small.embed_tokens[...] = model.embed_tokens[...]
    small.norm.weight[...] = model.norm.weight[...]
    if not cfg.tie_word_embeddings:
        small.lm_head[...] = model.lm_head[...]
    for big, lit, s in zip(model.layers, small.layers, scores):
        heads = np.sort(np.argsort(-s["heads"])[:num_heads])
        neurons = np.sort(np.argsort(-s["neurons"])[:intermediate])
        a, b = big.self_attn, lit.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(b, name)[...] = getattr(a, name)[...][:, heads]
        b.o_proj[...] = a.o_proj[...][heads]
        if cfg.qk_norm:
            b.q_norm.weight[...] = a.q_norm.weight[...]
            b.k_norm.weight[...] = a.k_norm.weight[...]
        for name in ("input_layernorm", "post_attention_layernorm"):
            getattr(lit, name).weight[...] = getattr(big, name).weight[...]
        lit.mlp.gate_proj[...] = big.mlp.gate_proj[...][:, neurons]
        lit.mlp.up_proj[...] = big.mlp.up_proj[...][:, neurons]
        lit.mlp.down_proj[...] = big.mlp.down_proj[...][neurons]
    return small


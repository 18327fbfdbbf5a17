"""LoRA students: Flax NNX's `nnx.LoRA` adapters on the decoder's projections.

Why nnx.LoRA modules beside our projections rather than qwix or nnx.LoRALinear:
the decoder keeps raw [H, N, D] weights, stacks k/v and gate/up into one matmul
and runs it through a hand-written weight-gradient VJP (layers.dense). qwix
finds a weight by identity of the `rhs` of an intercepted dot_general, which
never sees our (cast, stacked, custom-VJP-traced) weights; nnx.LoRALinear wraps
an nnx.Linear we do not have. So each targeted projection gets an `nnx.LoRA`
(A [in, r], B [r, out], `nnx.LoRAParam` variables) whose output, times
alpha / r, is added to the projection's (PEFT's `lora_dropout` on its input).
The LM head and the embedding are adapted through their weight (the fused loss
reads `lm_head_weight()`): W + (alpha/r)·A·B, and embedding rows E[x] + A[x]·B.

Names and meanings follow PEFT's LoraConfig: r, lora_alpha (scale alpha/r),
lora_dropout, target_modules (q_proj ... lm_head, embed_tokens).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gold_jax.lora_config import PEFT_MODULES, TARGETS, config_errors, parse_targets  # noqa: F401 (re-exported)

# The variables the optimizer sees; everything else (base weights, dropout RNG) is frozen.
ADAPTERS = nnx.LoRAParam
BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

    @property
    def scale(self) -> float:
        return float(self.alpha) / int(self.rank)

    @classmethod
    def from_config(cls, lc: Any) -> "LoraSpec | None":
        """The spec of config.model.lora, or None when rank == 0 (LoRA off)."""
        if int(lc.rank) == 0:
            return None
        return cls(int(lc.rank), float(lc.alpha), float(lc.dropout), tuple(parse_targets(lc.targets)))


class Adapter(nnx.Module):
    """alpha/r · dropout(x) · A · B for one projection (x flattened to [..., in])."""

    def __init__(self, n_in: int, n_out: int, spec: LoraSpec, axes: tuple[str, str], dtype: Any,
                 rngs: nnx.Rngs, dropout: bool = True):
        meta = lambda names: {"out_sharding": names, "eager_sharding": False}  # noqa: E731
        self.lora = nnx.LoRA(n_in, spec.rank, n_out, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                             a_metadata=meta((axes[0], "lora_rank")), b_metadata=meta(("lora_rank", axes[1])))
        self.scale = spec.scale
        # The stream is reseeded per step by the train step (train_step.reseed_dropout): the frozen
        # state holding it is never written back, so its counter alone would repeat the mask.
        self.dropout = nnx.Dropout(spec.dropout, rngs=nnx.Rngs(dropout=0)) \
            if dropout and spec.dropout > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dropout is not None:
            x = self.dropout(x)
        return self.lora(x) * jnp.asarray(self.scale, x.dtype)

    def delta(self) -> jax.Array:
        """The float32 [in, out] weight update alpha/r · A · B."""
        return (self.lora.lora_a[...] @ self.lora.lora_b[...]) * self.scale

    def rows(self, ids: jax.Array, dtype: Any) -> jax.Array:
        """Embedding update for token ids: alpha/r · A[ids] · B (PEFT's embedding LoRA: no dropout)."""
        a = jnp.take(self.lora.lora_a[...], ids, axis=0)
        return ((a @ self.lora.lora_b[...]) * self.scale).astype(dtype)


def attach(model: nnx.Module, spec: LoraSpec, seed: int = 0) -> nnx.Module:
    """Add adapters for `spec.targets` to a Decoder in place (the base weights are untouched)."""
    cfg = model.config
    bad = [t for t in spec.targets if t not in TARGETS]
    if bad:
        raise ValueError(f"config.model.lora.targets: {bad} do not exist in {cfg.architecture}; choose from {TARGETS}")
    if "lm_head" in spec.targets and cfg.tie_word_embeddings:
        raise ValueError(f"config.model.lora.targets: 'lm_head' does not exist in this {cfg.architecture} model "
                         "(tie_word_embeddings: the head is the embedding); target 'embed' instead")
    rngs = nnx.Rngs(params=seed)
    h, n, kv, d, i, vocab = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                             cfg.intermediate_size, cfg.vocab_size)
    cd = jnp.dtype(cfg.dtype)
    shapes = {"q": (h, n * d, ("embed", "heads")), "k": (h, kv * d, ("embed", "kv_heads")),
              "v": (h, kv * d, ("embed", "kv_heads")), "o": (n * d, h, ("heads", "embed")),
              "gate": (h, i, ("embed", "mlp")), "up": (h, i, ("embed", "mlp")), "down": (i, h, ("mlp", "embed"))}
    for layer in model.layers:
        for t in spec.targets:
            if t in shapes:
                n_in, n_out, axes = shapes[t]
                owner = layer.self_attn if t in ("q", "k", "v", "o") else layer.mlp
                setattr(owner, f"{t}_lora", Adapter(n_in, n_out, spec, axes, cd, rngs))
    if "lm_head" in spec.targets:   # adapted through the weight: no dropout (the fused loss reads the weight)
        model.lm_head_lora = Adapter(h, vocab, spec, ("embed", "vocab"), cd, rngs, dropout=False)
    if "embed" in spec.targets:
        model.embed_lora = Adapter(vocab, h, spec, ("vocab", "embed"), cd, rngs, dropout=False)
    return model


def split(model: nnx.Module) -> tuple[Any, nnx.State, nnx.State]:
    """(graphdef, adapters, frozen): the adapters train, the rest is passed to the step un-donated."""
    return nnx.split(model, ADAPTERS, ...)


def _merged_weights(model: nnx.Module) -> None:
    """Fold every adapter into its weight, in place (the model is a traced copy under jit)."""
    def fold(w: nnx.Variable, ad: Adapter | None) -> None:
        if ad is not None:
            w[...] = (w[...].astype(jnp.float32) + ad.delta().reshape(w.shape)).astype(w.dtype)
    for layer in model.layers:
        for t in ("q", "k", "v", "o"):
            fold(getattr(layer.self_attn, f"{t}_proj"), getattr(layer.self_attn, f"{t}_lora", None))
        for t in ("gate", "up", "down"):
            fold(getattr(layer.mlp, f"{t}_proj"), getattr(layer.mlp, f"{t}_lora", None))
    if getattr(model, "lm_head_lora", None) is not None:
        fold(model.lm_head, model.lm_head_lora)
    fold(model.embed_tokens, getattr(model, "embed_lora", None))


def merged_base_state(graphdef: Any, adapters: nnx.State, frozen: nnx.State) -> nnx.State:
    """The base model's state with W + alpha/r·A·B in every adapted weight (jit it: no host copy)."""
    model = nnx.merge(graphdef, adapters, frozen)
    _merged_weights(model)
    return nnx.state(model, BASE)


class LoraStudent:
    """A student with adapters: the split, the base graphdef and the jit'd merge for rollout/export.

    `base_ref` ({"path", "fingerprint"}) goes into checkpoints so a resume or export can refuse
    another base model."""

    def __init__(self, model: nnx.Module, spec: LoraSpec, seed: int = 0, mesh: Any = None,
                 base_path: str | None = None):
        self.spec = spec
        self.base_graphdef, _ = nnx.split(model)
        attach(model, spec, seed)
        if mesh is not None:   # adapters get their logical-axis shardings (sharding/rules.py)
            from gold_jax.models.partition import shard_model
            shard_model(model, mesh)
        self.graphdef, self.adapters, self.frozen = split(model)
        self._merge = jax.jit(lambda a, f: merged_base_state(self.graphdef, a, f))
        self.base_ref = None if base_path is None else {"path": os.path.abspath(base_path),
                                                        "fingerprint": base_fingerprint(base_path)}

    def merged_model(self, adapters: nnx.State) -> nnx.Module:
        """A plain Decoder with the adapters folded in (new device buffers; `adapters` may be donated later)."""
        return nnx.merge(self.base_graphdef, self._merge(adapters, self.frozen))


def student_from_config(cfg: Any, model: nnx.Module, mesh: Any = None) -> LoraStudent | None:
    """The run's LoraStudent (adapters attached to `model`), or None when config.model.lora.rank == 0."""
    spec = LoraSpec.from_config(cfg.model.lora)
    if spec is None:
        return None
    return LoraStudent(model, spec, seed=int(cfg.seed), mesh=mesh, base_path=cfg.model.student_path)


def base_fingerprint(model_dir: str) -> str:
    """sha256 of a HF folder's config.json and safetensors headers (names, dtypes, shapes, offsets).

    Reads a few KiB, not the weights: it tells a different base model apart, which is what a
    resume of adapters needs; it does not detect an in-place edit of the tensor bytes.
    """
    h = hashlib.sha256()
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {model_dir}")
    for name in ["config.json"] + files:
        path = os.path.join(model_dir, name)
        if not os.path.exists(path):
            continue
        with open(path, "rb") as f:
            if name.endswith(".safetensors"):
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else 0
                data = head + f.read(min(n, 100 << 20))
            else:
                data = json.dumps(json.load(f), sort_keys=True).encode()
        h.update(name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()


def check_base(saved: dict[str, Any] | None, model_dir: str) -> None:
    """Fail with both paths when a LoRA checkpoint was trained on another base model."""
    if saved is None:
        raise ValueError(f"the checkpoint holds no LoRA base reference: it is not a LoRA run "
                         f"(config.model.lora.rank); base model {model_dir}")
    now = base_fingerprint(model_dir)
    if saved.get("fingerprint") != now:
        raise ValueError(f"LoRA checkpoint was trained on the base model at {saved.get('path')!r} "
                         f"(fingerprint {str(saved.get('fingerprint'))[:12]}), but config.model.student_path="
                         f"{model_dir!r} is a different model (fingerprint {now[:12]})")

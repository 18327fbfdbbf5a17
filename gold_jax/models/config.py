"""ModelConfig: one frozen dataclass for the Llama / Qwen2 / Qwen3 decoder family."""
from __future__ import annotations

import dataclasses
from typing import Any

ARCHITECTURES = ("llama", "qwen2", "qwen3")
REMAT_POLICIES = ("none", "full", "dots")
ROPE_TYPES = (None, "default", "llama3")
from gold_jax.names import MODEL_DTYPES as DTYPES  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str                  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # None / {"rope_type": "default"} / {"rope_type": "llama3", ...}
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False       # q/k/v bias (qwen2); llama/qwen3 also put one on o_proj
    qk_norm: bool = False              # per-head RMSNorm on q and k (qwen3)
    max_position_embeddings: int = 2048
    dtype: str = "float32"             # compute dtype; softmax, norms and logits stay float32
    param_dtype: str = "float32"       # master parameter dtype
    remat: str = "none"                # per-layer jax.checkpoint policy: "none" | "full" | "dots"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None   # a tuple when config.json lists several
    pad_token_id: int | None = None

    def __post_init__(self):
        if isinstance(self.eos_token_id, list):   # keep the config hashable (jit static argument)
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r}; supported: {ARCHITECTURES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; supported: {REMAT_POLICIES}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; supported: {DTYPES}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise TypeError(f"rope_scaling must be a dict or None, got {type(self.rope_scaling)}")
            rt = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rt not in ROPE_TYPES:
                raise ValueError(f"rope_scaling rope_type={rt!r}; supported: None, 'default', 'llama3'")
            if rt == "llama3":
                need = ("factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings")
                missing = [k for k in need if k not in self.rope_scaling]
                if missing:
                    raise ValueError(f"rope_scaling (llama3) is missing keys {missing}")

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) or "default"

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def __hash__(self):  # rope_scaling is a dict; hash a frozen view so jit static args work
        fields = dataclasses.asdict(self)
        fields["rope_scaling"] = tuple(sorted((self.rope_scaling or {}).items()))
        return hash(tuple(fields.items()))

"""A LoRA run's adapters in PEFT's format: adapter_model.safetensors + adapter_config.json.

`peft.PeftModel.from_pretrained(base, out_dir)` loads them onto the transformers base model.
PEFT stores torch Linear layouts: lora_A.weight [r, in], lora_B.weight [out, r]; ours are
A [in, r], B [r, out] (x·A·B), so each is transposed. Embeddings use PEFT's
lora_embedding_A [r, vocab] / lora_embedding_B [hidden, r]. Our q/k/v outputs flatten
(heads, head_dim) row-major, as HF's q_proj rows do.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from gold_jax.lora_config import PEFT_MODULES
from gold_jax.models.lora import LoraSpec


def _pairs(model: Any) -> list[tuple[str, Any]]:
    """(HF module path, Adapter) for every adapter attached to a Decoder."""
    out = []
    for i, layer in enumerate(model.layers):
        for t in ("q", "k", "v", "o"):
            if (ad := getattr(layer.self_attn, f"{t}_lora", None)) is not None:
                out.append((f"model.layers.{i}.self_attn.{PEFT_MODULES[t]}", ad))
        for t in ("gate", "up", "down"):
            if (ad := getattr(layer.mlp, f"{t}_lora", None)) is not None:
                out.append((f"model.layers.{i}.mlp.{PEFT_MODULES[t]}", ad))
    if (ad := getattr(model, "lm_head_lora", None)) is not None:
        out.append(("lm_head", ad))
    if (ad := getattr(model, "embed_lora", None)) is not None:
        out.append(("model.embed_tokens", ad))
    return out


def peft_tensors(model: Any) -> dict[str, np.ndarray]:
    """PEFT state-dict names -> float32 arrays, from a Decoder with adapters attached."""
    out = {}
    for path, ad in _pairs(model):
        a = np.asarray(ad.lora.lora_a[...], np.float32)
        b = np.asarray(ad.lora.lora_b[...], np.float32)
        pre = f"base_model.model.{path}"
        if path.endswith("embed_tokens"):
            out[f"{pre}.lora_embedding_A"] = np.ascontiguousarray(a.T)
            out[f"{pre}.lora_embedding_B"] = np.ascontiguousarray(b.T)
        else:
            out[f"{pre}.lora_A.weight"] = np.ascontiguousarray(a.T)
            out[f"{pre}.lora_B.weight"] = np.ascontiguousarray(b.T)
    return out


def adapter_config(spec: LoraSpec, base_path: str) -> dict[str, Any]:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
            "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
            "target_modules": sorted(PEFT_MODULES[t] for t in spec.targets), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": None}


def save_peft(model: Any, spec: LoraSpec, base_path: str, out_dir: str) -> str:
    """Write adapter_model.safetensors + adapter_config.json for `model` (adapters attached)."""
    from safetensors.numpy import save_file
    os.makedirs(out_dir, exist_ok=True)
    save_file(peft_tensors(model), os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(adapter_config(spec, base_path), f, indent=2)
    return out_dir

"""The teacher's lm head on the trainer's side (gold.teacher_signal="hidden"), and its checksum.

A remote teacher that sends its final normed hidden states (2·H bytes a token
in bfloat16) leaves the last matmul to the trainer, which must hold exactly
the teacher's lm head. The head is read once, either from the teacher's HF
folder (`model.teacher_path`: only the head and final-norm tensors are read,
not the model) or from the server's `head` op. Either way its checksum is
compared with the one the server announces in `info`: a trainer that would
distil from another head fails at start-up instead of training on garbage.

The checksum is SHA-256 over the head [H, V] and the final norm weight [H],
each cast to bfloat16 (little-endian, C order), with their shapes: a server
that holds the weights in bfloat16 and a trainer that reads the float32 file
agree, and the final norm is covered because the hidden states sent are
normed by it.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import ml_dtypes
import numpy as np

CHECKSUM_VERSION = "gold-head-v1"


def head_checksum(head: np.ndarray, norm: np.ndarray) -> str:
    """Hex SHA-256 of (head [H, V], final norm [H]) as bfloat16, with their shapes."""
    head, norm = np.asarray(head), np.asarray(norm)
    if head.ndim != 2 or norm.shape != (head.shape[0],):
        raise ValueError(f"head must be [H, V] and norm [H], got {head.shape} and {norm.shape}")
    h = hashlib.sha256(f"{CHECKSUM_VERSION}:{head.shape[0]}x{head.shape[1]}".encode())
    for a in (head, norm):
        h.update(np.ascontiguousarray(a.astype(ml_dtypes.bfloat16)).view("<u2").tobytes())
    return h.hexdigest()


def head_from_model(model: Any) -> tuple[np.ndarray, np.ndarray]:
    """(head [H, V], final norm weight [H]) of a gold_jax Decoder, on the host."""
    import jax
    return (np.asarray(jax.device_get(model.lm_head_weight())),
            np.asarray(jax.device_get(model.norm.weight[...])))


def load_head(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(head [H, V], final norm weight [H]) read from an HF folder's safetensors (nothing else is loaded)."""
    from gold_jax.models.hf_io import _safe_open, _tensor_files
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"config.model.teacher_path={path!r} has no config.json (the teacher head is read "
                         "from the teacher's HF folder)")
    with open(cfg_path) as f:
        tied = bool(json.load(f).get("tie_word_embeddings", False))
    files = _tensor_files(path)
    names = ("model.embed_tokens.weight" if tied or "lm_head.weight" not in files else "lm_head.weight",
             "model.norm.weight")
    out = []
    for name in names:
        if name not in files:
            raise ValueError(f"config.model.teacher_path={path!r}: no tensor {name!r} in its safetensors")
        with _safe_open(files[name]) as f:
            out.append(f.get_tensor(name))
    head_vh, norm = out
    return np.ascontiguousarray(head_vh.T), norm   # HF [V, H] -> ours [H, V]


def check_checksum(got: str, expected: str, source: str) -> None:
    """A clear error when the head the trainer holds is not the server's."""
    if got != expected:
        raise ValueError(f"teacher head checksum mismatch: the head from {source} has {got[:16]}..., the teacher "
                         f"server announces {expected[:16]}...; config.model.teacher_path must be the folder the "
                         "server loads (or leave it empty to fetch the head from the server)")

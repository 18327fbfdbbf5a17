"""Teacher backends: "jax" (always available) and "vllm" (imported only when chosen)."""
from __future__ import annotations

from typing import Any

from gold_jax.teacher.backends.base import TeacherBackend

BACKENDS = ("jax", "vllm")


def make_backend(kind: str, model_path: str, **kw: Any) -> TeacherBackend:
    """Backend over the HF-format folder `model_path` (weights and tokenizer)."""
    if not isinstance(model_path, str) or not model_path:
        raise ValueError(f"model_path must be a non-empty path, got {model_path!r}")
    if kind == "jax":
        from gold_jax.teacher.backends.jax_backend import JaxBackend
        return JaxBackend.from_pretrained(model_path, **kw)
    if kind == "vllm":
        from gold_jax.teacher.backends.vllm_backend import VllmBackend
        return VllmBackend(model_path, **kw)
    raise ValueError(f"teacher backend kind={kind!r}; supported: {BACKENDS}")


__all__ = ["BACKENDS", "TeacherBackend", "make_backend"]

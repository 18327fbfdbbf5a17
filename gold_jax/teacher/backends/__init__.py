"""Teacher backends: "jax" (always available) and "vllm" (imported only when chosen)."""
from __future__ import annotations

from typing import Any

from gold_jax.teacher.backends.base import TeacherBackend

from gold_jax.names import TEACHER_BACKENDS as BACKENDS

# teacher.dtype / --dtype: auto = bfloat16 on accelerators, float32 on CPU (jax); the
# checkpoint's own dtype (vllm, whose "auto" means that).
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")


def make_backend(kind: str, model_path: str, *, dtype: str = "auto", **kw: Any) -> TeacherBackend:
    """Backend over the HF-format folder `model_path` (weights and tokenizer), weights in `dtype`."""
    if not isinstance(model_path, str) or not model_path:
        raise ValueError(f"model_path must be a non-empty path, got {model_path!r}")
    if dtype not in TEACHER_DTYPES:
        raise ValueError(f"teacher dtype={dtype!r}; supported: {TEACHER_DTYPES}")
    if kind == "jax":
        import jax

        from gold_jax.config import resolve_dtype
        from gold_jax.teacher.backends.jax_backend import JaxBackend
        return JaxBackend.from_pretrained(model_path, dtype=resolve_dtype(dtype, jax.devices()[0].platform), **kw)
    if kind == "vllm":
        from gold_jax.teacher.backends.vllm_backend import VllmBackend
        return VllmBackend(model_path, **({} if dtype == "auto" else {"dtype": dtype}), **kw)
    raise ValueError(f"teacher backend kind={kind!r}; supported: {BACKENDS}")


__all__ = ["BACKENDS", "TEACHER_DTYPES", "TeacherBackend", "make_backend"]

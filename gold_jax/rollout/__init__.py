"""Rollout engines: the embedded JAX sampler (always available) and vLLM (optional extra)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gold_jax.rollout.base import RolloutEngine

from gold_jax.names import ROLLOUT_ENGINES as ENGINES


def make_engine(kind: str, model: Any, *, eos_id: int | Sequence[int], pad_id: int, mesh=None,
                model_dir: str | None = None, **kw: Any) -> RolloutEngine:
    """Build the engine named by `rollout.engine`.

    "jax": JaxSampler(model, ...) on `mesh`. "vllm": VllmEngine over `model_dir`
    (an HF checkpoint of the student, e.g. written by models.hf_io.save_pretrained);
    vLLM is imported only here, and a missing install is a clear ImportError.
    """
    if kind == "jax":
        from gold_jax.rollout.jax_sampler import JaxSampler
        return JaxSampler(model, eos_id=eos_id, pad_id=pad_id, mesh=mesh, **kw)
    if kind == "vllm":
        if model_dir is None:
            raise ValueError("make_engine('vllm'): model_dir (an HF-format checkpoint directory) is required")
        from gold_jax.rollout.vllm_engine import VllmEngine
        return VllmEngine(model_dir, eos_id=eos_id, pad_id=pad_id, **kw)
    raise ValueError(f"rollout engine kind={kind!r}; supported: {ENGINES}")


__all__ = ["RolloutEngine", "make_engine", "ENGINES"]

"""Generalized Jensen-Shannon divergence losses for GOLD distillation.

P = teacher, Q = student, M = beta P + (1-beta) Q; beta = 0 is KL(P||Q) and
beta = 1 is KL(Q||P). All variants share reductions: "batchmean" (sum over kept
tokens / kept tokens, 0 if none), "sum" (for gradient accumulation: divide by
the kept-token count of the whole accumulated batch), "mean" (sum / (kept x V),
as torch/TRL) and "none" (per-token, 0 where masked).

The training losses and their needs are listed in `registry.LOSSES`. Names
below load on first use (PEP 562), so `gold_jax.losses.registry` can be read by
config validation without importing jax.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "generalized_jsd": "gold_jax.losses.dense",
    "topk_jsd": "gold_jax.losses.topk",
    "vocab_parallel_jsd": "gold_jax.losses.vocab_parallel",
    "vocab_parallel_topk_jsd": "gold_jax.losses.vocab_parallel",
    "fused_jsd": "gold_jax.losses.fused",
    "loss_sum_and_count": "gold_jax.losses.core",
    "reduce_tokens": "gold_jax.losses.core",
    "REDUCTIONS": "gold_jax.names",
    "TOPK_MODES": "gold_jax.names",
    "LOSSES": "gold_jax.losses.registry",
    "LossSpec": "gold_jax.losses.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gold_jax.losses' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

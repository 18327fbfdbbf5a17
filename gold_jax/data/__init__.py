"""Data: tokenizer utility, dataset formats, tokenisation and the grain pipeline.

Names load on first use (PEP 562): `gold_jax.data.config` must stay importable
without grain, transformers or torch, for config validation in about a second.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "default_data_config": "gold_jax.data.config",
    "build_dataset": "gold_jax.data.pipeline", "iterator_state_from_json": "gold_jax.data.pipeline",
    "iterator_state_to_json": "gold_jax.data.pipeline", "make_iterator": "gold_jax.data.pipeline",
    "load_rows": "gold_jax.data.sources",
    "DatasetStats": "gold_jax.data.tokenize", "tokenize_files": "gold_jax.data.tokenize",
    "load_tokenizer": "gold_jax.data.tokenizer", "train_tokenizer": "gold_jax.data.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gold_jax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

"""The rollout-engine interface and the host-side helpers both engines share.

The trainer and the teacher's `generate` op only see `RolloutEngine`; whether
tokens come from the embedded JAX sampler or from vLLM hides behind it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from gold_jax.types import FINISH_EOS, FINISH_LENGTH, RolloutResult


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray, *, n: int = 1,
                 max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
                 seed: int, row_offset: int = 0) -> RolloutResult:
        """Sample n completions per left-padded prompt (see gold_jax.types for the layout).

        row_offset: the global batch index of prompt 0, so a row's randomness is the same whichever
        process samples it (per-host rollout; 0 on one process)."""
        ...

    def sync_weights(self, model_or_state: Any) -> float:
        """Load the trainer's current parameters; returns the seconds it took (timing/sync)."""
        ...

    def close(self) -> None:
        ...


def normalize_eos(eos_id: int | Sequence[int]) -> tuple[int, ...]:
    ids = (eos_id,) if isinstance(eos_id, (int, np.integer)) else tuple(eos_id)
    if not ids or not all(isinstance(i, (int, np.integer)) and i >= 0 for i in ids):
        raise ValueError(f"eos_id must be a non-negative int or a non-empty sequence of them, got {eos_id!r}")
    return tuple(int(i) for i in ids)


def validate_request(prompt_ids: Any, prompt_mask: Any, *, n: int, max_new_tokens: int,
                     temperature: float, top_p: float, top_k: int,
                     vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Check a generate() call; returns int32 copies of the prompt arrays."""
    ids = np.asarray(prompt_ids)
    mask = np.asarray(prompt_mask)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be a non-empty [B, P] array, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"prompt_ids must be integer, got dtype {ids.dtype}")
    if mask.shape != ids.shape:
        raise ValueError(f"prompt_mask shape {mask.shape} != prompt_ids shape {ids.shape}")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise TypeError(f"prompt_mask must be integer or bool, got dtype {mask.dtype}")
    mask = mask.astype(np.int32)
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("prompt_mask must hold only 0 and 1")
    if (mask.sum(1) == 0).any():
        raise ValueError(f"prompt_mask: rows {np.nonzero(mask.sum(1) == 0)[0].tolist()} have no prompt token")
    if (np.diff(mask, axis=1) < 0).any():
        raise ValueError("prompt_mask must be left-padded (zeros, then ones) in every row")
    real = ids[mask == 1]
    if (real < 0).any() or (vocab_size is not None and (real >= vocab_size).any()):
        raise ValueError(f"prompt_ids must lie in [0, {vocab_size}) on real tokens")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    return ids.astype(np.int32), mask


def finish_result(prompt_ids: np.ndarray, prompt_mask: np.ndarray, completion_ids: np.ndarray,
                  completion_mask: np.ndarray, logprobs: np.ndarray,
                  eos_ids: tuple[int, ...], pad_id: int) -> RolloutResult:
    """Assemble a RolloutResult from already-repeated prompts and raw completions.

    Enforces the layout: pad id and log-prob 0 where the mask is 0, finish
    reason EOS when the last kept token is an EOS id.
    """
    cm = completion_mask.astype(np.int32)
    ids = np.where(cm == 1, completion_ids, pad_id).astype(np.int32)
    lp = np.where(cm == 1, logprobs, 0.0).astype(np.float32)
    length = cm.sum(1)
    last = ids[np.arange(len(ids)), np.maximum(length - 1, 0)]
    ended = (length > 0) & np.isin(last, eos_ids)
    finish = np.where(ended, FINISH_EOS, FINISH_LENGTH).astype(np.int32)
    return RolloutResult(prompt_ids=prompt_ids.astype(np.int32), prompt_mask=prompt_mask.astype(np.int32),
                         completion_ids=ids, completion_mask=cm, logprobs=lp, finish_reason=finish)


def end_at_eos(completion_ids: np.ndarray, completion_mask: np.ndarray, eos_ids: tuple[int, ...],
               pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) with each row's mask ending at its first id of `eos_ids` (kept), pad after it.

    A completion made by another model (the teacher under seq_kd, which may stop on
    other ids) then ends where the student's EOS set says it does.
    """
    ids = np.asarray(completion_ids, np.int32)
    mask = np.asarray(completion_mask, np.int32)
    hit = np.isin(ids, np.asarray(eos_ids, np.int32)) & (mask == 1)
    first = np.where(hit.any(1), hit.argmax(1), ids.shape[1])
    keep = (np.arange(ids.shape[1])[None, :] <= first[:, None]) & (mask == 1)
    return np.where(keep, ids, pad_id).astype(np.int32), keep.astype(np.int32)

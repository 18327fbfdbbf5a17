"""Argument checks shared by every loss variant.

Hyper-parameters (beta, temperature, reduction, mode) are static Python values:
beta == 0 and beta == 1 select different formulas, so they cannot be traced.
Index ranges can only be checked on concrete arrays; under jit the losses clamp.
"""
from __future__ import annotations

import numbers

import jax
import numpy as np

from gold_jax.names import REDUCTIONS, TOPK_MODES


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_beta(beta) -> float:
    if _is_traced(beta) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a static Python float in [0, 1], got {type(beta).__name__}")
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return beta


def check_temperature(temperature) -> float:
    if _is_traced(temperature) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a static Python float > 0, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not (temperature > 0.0 and np.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return temperature


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_mode(mode: str, allowed=TOPK_MODES) -> str:
    if mode not in allowed:
        raise ValueError(f"mode must be one of {allowed}, got {mode!r}")
    return mode


def check_mask(mask, token_shape: tuple[int, ...], name: str = "mask") -> None:
    if tuple(np.shape(mask)) != tuple(token_shape):
        raise ValueError(f"{name} has shape {tuple(np.shape(mask))}, expected the token shape {tuple(token_shape)}")


def check_same_shape(a, b, name_a: str, name_b: str) -> None:
    if tuple(np.shape(a)) != tuple(np.shape(b)):
        raise ValueError(f"{name_a} {tuple(np.shape(a))} and {name_b} {tuple(np.shape(b))} must have the same shape")


def check_hidden_head(hidden, lm_head, chunk_size) -> None:
    """Shapes of a fused loss's inputs: hidden [N, H] or [B, T, H], lm_head [H, V], chunk_size a positive int."""
    if hidden.ndim < 2:
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got shape {hidden.shape}")
    if lm_head.ndim != 2 or lm_head.shape[0] != hidden.shape[-1]:
        raise ValueError(f"lm_head must be [H, V] with H = {hidden.shape[-1]} (hidden's last axis), "
                         f"got shape {lm_head.shape}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def check_vocab_size(vocab_size, logits_vocab: int) -> int:
    """Real vocabulary size; logits columns at or beyond it are embedding padding."""
    if vocab_size is None:
        return int(logits_vocab)
    if _is_traced(vocab_size) or not isinstance(vocab_size, numbers.Integral):
        raise TypeError(f"vocab_size must be a static int, got {type(vocab_size).__name__}")
    if not 0 < int(vocab_size) <= logits_vocab:
        raise ValueError(f"vocab_size must be in [1, {logits_vocab}] (the logits' last axis), got {vocab_size}")
    return int(vocab_size)


def check_topk(student_shape, teacher_logprobs, teacher_ids, mask, teacher_logmass, vocab_size: int) -> None:
    """Shapes and dtypes of a top-k teacher; the id range when the ids are concrete."""
    token_shape = tuple(student_shape[:-1])
    check_same_shape(teacher_logprobs, teacher_ids, "teacher_logprobs", "teacher_ids")
    if tuple(np.shape(teacher_ids)[:-1]) != token_shape or len(np.shape(teacher_ids)) != len(student_shape):
        raise ValueError(f"teacher_ids has shape {tuple(np.shape(teacher_ids))}, expected {token_shape} + (k,) "
                         f"to match student_logits {tuple(student_shape)}")
    if np.shape(teacher_ids)[-1] < 1:
        raise ValueError("teacher_ids must hold at least one id per token (k >= 1)")
    if not np.issubdtype(np.dtype(teacher_ids.dtype), np.integer):
        raise TypeError(f"teacher_ids must be an integer array, got dtype {teacher_ids.dtype}")
    check_mask(mask, token_shape)
    if teacher_logmass is not None:
        check_mask(teacher_logmass, token_shape, "teacher_logmass")
    if not _is_traced(teacher_ids):
        ids = np.asarray(teacher_ids)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"teacher_ids must be in [0, {vocab_size}), got values in [{ids.min()}, {ids.max()}]")

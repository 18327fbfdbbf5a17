"""The interface every teacher backend implements (jax, vllm, and the test fake).

Scoring convention (gold_jax.types layout): for ``completion_start=s`` row j of
the result is the distribution that predicts token ``s + j`` (the logits at
position ``s - 1 + j``), so the result has ``L - s`` rows; ``None`` scores all
positions 1..L-1. Ids at or above ``info()["vocab_size"]`` (embedding padding
beyond the tokenizer) are dropped before the log-softmax, so they are never
returned and the distributions sum to one over real tokens.
"""
from __future__ import annotations

import abc
from typing import Any

import numpy as np

from gold_jax.types import RolloutResult, TeacherScores

INFO_KEYS = ("model_name", "vocab_size", "embedding_size", "tokenizer_fingerprint", "max_length", "max_top_k")
# H7: a backend that serves hidden states (score signal "hidden") and its head (op "head") says so here.
OPTIONAL_INFO_KEYS = ("hidden_size", "head_checksum")
# Issue 15: "cross_tokenizer": True when the backend has a `tokenizer` attribute and scores text for a student
# of another tokenizer (score signal "cross", op "vocab"; gold_jax.crosstok.request).


class TeacherBackend(abc.ABC):
    """Scores token sequences (top-k log-probs) and samples completions."""

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """dict with INFO_KEYS."""

    @abc.abstractmethod
    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, top_k: int,
              temperature: float, completion_start: int | None) -> TeacherScores:
        """Top-k (or full, top_k=0) log-probs at `temperature` for the scored span."""

    @abc.abstractmethod
    def generate(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray, *, max_new_tokens: int,
                 temperature: float, top_p: float, top_k: int, seed: int) -> RolloutResult:
        """Teacher completions (seq_kd)."""

    def hidden(self, input_ids: np.ndarray, attention_mask: np.ndarray, *,
               completion_start: int | None) -> np.ndarray:
        """[B, L - s, H] bfloat16 final normed hidden states at the positions that predict tokens s.. (H7)."""
        raise NotImplementedError(f"{type(self).__name__} does not serve hidden states")

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """(lm head [H, V], final norm weight [H]) on the host (H7)."""
        raise NotImplementedError(f"{type(self).__name__} does not serve its head")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release engines / devices."""


def check_info(info: dict[str, Any]) -> dict[str, Any]:
    """Validate a backend's (or a remote worker's) info dict."""
    if not isinstance(info, dict) or any(k not in info for k in INFO_KEYS):
        raise ValueError(f"teacher info must have keys {INFO_KEYS}, got {str(info)[:200]}")
    for k in ("vocab_size", "embedding_size", "max_length", "max_top_k"):
        if not isinstance(info[k], int) or isinstance(info[k], bool) or info[k] <= 0:
            raise ValueError(f"teacher info {k!r} must be a positive int, got {info[k]!r}")
    for k in ("model_name", "tokenizer_fingerprint"):
        if not isinstance(info[k], str) or not 0 < len(info[k]) <= 1024:
            raise ValueError(f"teacher info {k!r} must be a non-empty string, got {str(info[k])[:64]!r}")
    if info["embedding_size"] < info["vocab_size"]:
        raise ValueError(f"teacher embedding_size {info['embedding_size']} < tokenizer vocab_size "
                         f"{info['vocab_size']}")
    out = {k: info[k] for k in INFO_KEYS}
    if "hidden_size" in info:
        h, c = info["hidden_size"], info.get("head_checksum")
        if not isinstance(h, int) or isinstance(h, bool) or h <= 0:
            raise ValueError(f"teacher info 'hidden_size' must be a positive int, got {h!r}")
        if not isinstance(c, str) or len(c) != 64:
            raise ValueError(f"teacher info 'head_checksum' must be a sha256 hex string, got {str(c)[:64]!r}")
        out.update(hidden_size=h, head_checksum=c)
    if "cross_tokenizer" in info:
        if not isinstance(info["cross_tokenizer"], bool):
            raise ValueError(f"teacher info 'cross_tokenizer' must be a bool, got {info['cross_tokenizer']!r}")
        out["cross_tokenizer"] = info["cross_tokenizer"]
    return out


def scores_from_logits_np(logits: np.ndarray, input_ids: np.ndarray, *, top_k: int, temperature: float,
                          completion_start: int | None, vocab_size: int) -> TeacherScores:
    """float64 NumPy reference of the scoring convention (tests, fake backend)."""
    s = 1 if completion_start is None else completion_start
    z = np.asarray(logits, np.float64)[:, s - 1:-1, :vocab_size] / temperature
    m = z.max(-1, keepdims=True)
    logp = z - (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))
    nxt = np.asarray(input_ids)[:, s:]
    tok = np.take_along_axis(logp, nxt[..., None], -1)[..., 0]
    if top_k == 0:
        return TeacherScores(logp.astype(np.float32), None, None, tok.astype(np.float32))
    ids = np.argsort(-logp, axis=-1, kind="stable")[..., :top_k]
    lp = np.take_along_axis(logp, ids, -1)
    mk = lp.max(-1, keepdims=True)
    mass = (mk + np.log(np.exp(lp - mk).sum(-1, keepdims=True)))[..., 0]
    return TeacherScores(lp.astype(np.float32), ids.astype(np.int32), mass.astype(np.float32),
                         tok.astype(np.float32))

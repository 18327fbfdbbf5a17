"""The "vllm" teacher backend: top-k scores from vLLM's prompt_logprobs, samples from its generate.

Same output contract as the jax backend (see base.py), with these facts of vLLM
(0.32) behind the two scoring paths:

- prompt log-probs are the log-softmax of the raw logits: prompt tokens skip the
  sampling processors, so neither `SamplingParams.temperature` nor
  `logprobs_mode="processed_logprobs"` reaches them;
- position 0 has no entry, and each other position holds the actual next token
  first, then the top-n in rank order (n + 1 entries, the actual one possibly twice).

Full-row path (embedding size <= `full_rows_max_vocab`): ask for every id
(prompt_logprobs=-1), drop the embedding padding, and compute log_softmax(logp / T)
in float64. Exact at any temperature (logp / T differs from logits / T by a
constant per row), and it serves top_k=0.
Top-k path (larger vocabularies): temperature 1 only, otherwise a clear error.
vLLM's top-k log-probs are already normalised over the full vocabulary, so the
top-k log-mass is their logsumexp, exact up to float32 rounding of each term.
Embedding padding: ask for k + n_pad entries, drop padding ids, and renormalise by
the padding mass among them; padding ids outside that set are below every kept
id and their mass is neglected (exact when the padding rows are all in the set or
carry no mass, as for trained checkpoints; imprecise when padding holds most of it).
Ties in rank order follow vLLM's top-k (the full-row path: lower id first, like the jax backend).
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from gold_jax.names import VLLM_FULL_ROWS_MAX_VOCAB
from gold_jax.rollout.vllm_engine import VllmEngine, flat_logprobs_kw  # vLLM itself loads in VllmEngine()
from gold_jax.teacher.backends.base import TeacherBackend
from gold_jax.types import RolloutResult, TeacherScores


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)))[..., 0]


def _span(mask_row: np.ndarray) -> tuple[int, int]:
    """[first, end) of the one contiguous run of real tokens (left-padded prompt, right-padded completion)."""
    real = np.nonzero(mask_row)[0]
    if len(real) == 0:
        raise ValueError("attention_mask has a row with no real token")
    first, end = int(real[0]), int(real[-1]) + 1
    if len(real) != end - first:
        raise ValueError("attention_mask must be one contiguous run of ones per row (left-padded prompt, "
                         "right-padded completion)")
    return first, end


def _entries(plp: Any, tokens: np.ndarray, n_top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top ids [n-1, n_top] in rank order, their log-probs, the actual next token's log-prob [n-1])
    for positions 1..n-1 of a prompt of n `tokens` (position 0 has no entry)."""
    n_pos = len(tokens)
    if hasattr(plp, "start_indices"):  # FlatLogprobs: [actual, top-1, ..., top-n_top] per position
        s, e = np.asarray(plp.start_indices[1:]), np.asarray(plp.end_indices[1:])
        if not (e - s == n_top + 1).all():
            raise RuntimeError(f"vLLM returned {sorted(set((e - s).tolist()))} prompt logprob entries per "
                               f"position, expected {n_top + 1}")
        ids = np.asarray(plp.token_ids[s[0]:e[-1]], np.int64).reshape(n_pos - 1, n_top + 1)
        lp = np.asarray(plp.logprobs[s[0]:e[-1]], np.float64).reshape(n_pos - 1, n_top + 1)
        return ids[:, 1:], lp[:, 1:], lp[:, 0]
    # list of {id: Logprob} dicts: n_top entries, or n_top + 1 when the actual token ranks lower.
    ids = np.zeros((n_pos - 1, n_top), np.int64)
    lp = np.zeros((n_pos - 1, n_top), np.float64)
    actual = np.zeros(n_pos - 1, np.float64)
    for i in range(1, n_pos):
        d = plp[i]
        ranked = sorted(d.items(), key=lambda kv: (kv[1].rank, -kv[1].logprob))[:n_top]
        ids[i - 1] = [t for t, _ in ranked]
        lp[i - 1] = [v.logprob for _, v in ranked]
        actual[i - 1] = d[int(tokens[i])].logprob
    return ids, lp, actual


class VllmBackend(TeacherBackend):
    """Teacher scores and samples from a vLLM engine over an HF folder (weights + tokenizer).

    Extra keyword arguments go to the engine (`gpu_memory_utilization`, `dtype`,
    `max_model_len`, or anything `vllm.LLM` takes).
    """

    def __init__(self, model_path: str, *, model_name: str | None = None, max_top_k: int = 1024,
                 full_rows_max_vocab: int = VLLM_FULL_ROWS_MAX_VOCAB, **engine_kw: Any):
        from gold_jax.data import load_tokenizer
        from gold_jax.fingerprint import tokenizer_fingerprint, tokenizer_size
        tok = load_tokenizer(model_path)
        with open(os.path.join(model_path, "config.json")) as f:
            hf = json.load(f)
        vocab, embed = tokenizer_size(tok), int(hf["vocab_size"])
        if vocab > embed:
            raise ValueError(f"tokenizer has {vocab} ids but the model only {embed} embedding rows")
        self.n_pad = embed - vocab
        self.full_rows = embed <= full_rows_max_vocab
        max_top_k = min(int(max_top_k), vocab)
        from gold_jax.data.special_tokens import EOS_ATTR
        # The whole EOS set (tokenizer + config/generation_config): vLLM stops on any of them.
        eos = getattr(tok, EOS_ATTR, None) or (tok.eos_token_id if tok.eos_token_id is not None
                                               else hf.get("eos_token_id"))
        first = eos[0] if isinstance(eos, (tuple, list)) else eos
        pad = tok.pad_token_id if tok.pad_token_id is not None else (first or 0)
        # max_logprobs bounds what a request may ask for: full rows, or top-k plus the padding ids.
        self.engine = VllmEngine(model_path, eos_id=eos, pad_id=pad, sample_vocab=vocab,
                                 max_logprobs=embed if self.full_rows else max_top_k + self.n_pad, **engine_kw)
        self._vllm = self.engine._vllm
        self._info = {"model_name": model_name or os.path.basename(os.path.normpath(model_path)),
                      "vocab_size": vocab, "embedding_size": embed,
                      "tokenizer_fingerprint": tokenizer_fingerprint(tok),
                      "max_length": self.engine.max_model_len, "max_top_k": max_top_k,
                      "cross_tokenizer": True}   # issue 15: the worker aligns text through self.tokenizer
        self.tokenizer = tok

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def _check(self, ids: np.ndarray, top_k: int, temperature: float) -> None:
        vocab = self._info["vocab_size"]
        if not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= self._info["max_top_k"]:
            raise ValueError(f"top_k must be in [0, {self._info['max_top_k']}], got {top_k!r}")
        if not np.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not self.full_rows and top_k == 0:
            raise ValueError(f"the vllm teacher backend returns full rows (top_k=0) only for vocabularies of at "
                             f"most full_rows_max_vocab ids; this model has {self._info['embedding_size']}")
        if not self.full_rows and temperature != 1.0:
            raise ValueError(
                f"the vllm teacher backend scores only at temperature 1.0 (got {temperature}) for this "
                f"vocabulary ({self._info['embedding_size']} ids > full_rows_max_vocab): vLLM computes prompt "
                "logprobs from the raw logits (prompt tokens skip temperature and logprobs_mode), and the "
                "top-k of log_softmax(z) does not give the normaliser of log_softmax(z / T). "
                "Use the jax teacher backend, or gold.temperature=1.0")
        if (ids < 0).any() or (ids >= vocab).any():
            raise ValueError(f"input_ids must lie in [0, {vocab}) (the tokenizer's ids)")

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, top_k: int,
              temperature: float, completion_start: int | None) -> TeacherScores:
        ids = np.asarray(input_ids)
        mask = np.asarray(attention_mask)
        if ids.ndim != 2 or mask.shape != ids.shape or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be an integer [B, L] array with a mask of the same shape, got "
                             f"{ids.shape} {ids.dtype} and {mask.shape}")
        b, length = ids.shape
        start = 1 if completion_start is None else int(completion_start)
        if not 1 <= start < length:
            raise ValueError(f"completion_start={completion_start} must be in [1, {length - 1}]")
        temperature = float(temperature)
        spans = [_span(m) for m in mask]
        self._check(np.concatenate([r[f:e] for r, (f, e) in zip(ids, spans)]), top_k, temperature)
        if self.engine.llm is None:
            raise RuntimeError("VllmBackend.score after close()")
        full = self.full_rows and (top_k == 0 or temperature != 1.0 or self.n_pad > 0)
        n_req = -1 if full else int(top_k) + self.n_pad
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=n_req,
                                           detokenize=False, **flat_logprobs_kw(self._vllm))
        outs = self.engine.llm.generate([{"prompt_token_ids": r[f:e].tolist()} for r, (f, e) in zip(ids, spans)],
                                        params, use_tqdm=False)
        rows, vocab = length - start, self._info["vocab_size"]
        width = vocab if top_k == 0 else int(top_k)
        # Unscored positions (padding, or the first real token: no context) get a uniform row, so
        # masked positions stay finite in the loss.
        lp = np.full((b, rows, width), -np.log(vocab), np.float32)
        top = np.broadcast_to(np.arange(width, dtype=np.int32), (b, rows, width)).copy()
        mass = np.full((b, rows), np.log(width / vocab), np.float32)
        tok = np.full((b, rows), -np.log(vocab), np.float32)
        for r, (out, (f, e)) in enumerate(zip(outs, spans)):
            a = np.arange(max(start, f + 1), e)  # absolute positions of the scored next tokens
            if len(a) == 0:
                continue
            n_top = self._info["embedding_size"] if full else int(top_k) + self.n_pad
            top_ids, top_lp, actual = _entries(out.prompt_logprobs, ids[r, f:e], n_top)
            sel = a - f - 1  # row of _entries for position a
            j = a - start
            if full:
                logp, tok[r, j] = self._from_full(top_ids[sel], top_lp[sel], ids[r, a], temperature)
                if top_k == 0:
                    lp[r, j] = logp
                    continue
                ids_k = np.argsort(-logp, axis=-1, kind="stable")[:, :top_k]  # ties: lower id first
                lp_k = np.take_along_axis(logp, ids_k, -1)
            else:
                ids_k, lp_k, tok[r, j] = self._from_topk(top_ids[sel], top_lp[sel], actual[sel], top_k)
            lp[r, j], top[r, j], mass[r, j] = lp_k, ids_k, _logsumexp(lp_k)
        if top_k == 0:
            return TeacherScores(logprobs=lp, ids=None, topk_logmass=None, token_logprob=tok)
        return TeacherScores(logprobs=lp, ids=top, topk_logmass=mass, token_logprob=tok)

    def _from_full(self, ids: np.ndarray, lps: np.ndarray, nxt: np.ndarray,
                   temperature: float) -> tuple[np.ndarray, np.ndarray]:
        """Dense float64 log-probs over the tokenizer's ids at `temperature`, and the next token's."""
        vocab = self._info["vocab_size"]
        dense = np.full((len(ids), self._info["embedding_size"]), -np.inf)
        np.put_along_axis(dense, ids, lps, -1)
        z = dense[:, :vocab] / temperature
        logp = z - _logsumexp(z)[:, None]
        return logp, logp[np.arange(len(nxt)), nxt]

    def _from_topk(self, ids: np.ndarray, lps: np.ndarray, actual: np.ndarray,
                   top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, log-probs) of the top_k tokenizer ids in rank order, renormalised without the
        padding ids seen among the entries, and the next token's log-prob on the same footing."""
        keep = ids < self._info["vocab_size"]
        if int(keep.sum(-1).min()) < top_k:
            raise RuntimeError(f"vLLM returned fewer than top_k={top_k} real-token entries")
        order = np.argsort(~keep, axis=-1, kind="stable")[:, :top_k]  # kept entries first, rank order kept
        pad_mass = np.where(keep, 0.0, np.exp(lps)).sum(-1)
        shift = np.log1p(-np.minimum(pad_mass, 1.0 - 1e-12))
        kept = np.take_along_axis(lps, order, -1) - shift[:, None]
        return np.take_along_axis(ids, order, -1), kept, actual - shift

    def generate(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray, *, max_new_tokens: int,
                 temperature: float, top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> RolloutResult:
        return self.engine.generate(prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)

    def close(self) -> None:
        self.engine.close()

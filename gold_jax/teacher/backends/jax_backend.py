"""The "jax" teacher backend: our NNX decoder from an HF folder, jit-compiled.

Batches are padded to power-of-two rows and lengths to a multiple of
`length_bucket` (16: the data pipeline already buckets lengths, so a coarser
multiple would only add padded compute), so a stream of slightly different shapes compiles a handful of
programs, not one per request. Right-padding the length is exact: attention is
causal and positions come from the mask. Only the scored span goes through the
lm head, and the log-softmax, top-k and log-mass are computed on the device in
float32 from the full row.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gold_jax.fingerprint import tokenizer_fingerprint, tokenizer_size
from gold_jax.teacher.backends.base import TeacherBackend
from gold_jax.types import RolloutResult, TeacherScores


def score_from_hidden(model: nnx.Module, ids: jax.Array, mask: jax.Array, temperature: jax.Array, *,
                      top_k: int, start: int, vocab_size: int):
    """(logprobs, ids|None, logmass|None, token_logprob) for positions predicting tokens start..L-1."""
    h = model.hidden(ids, mask)[:, start - 1:-1]
    z = model.logits_from_hidden(h)[..., :vocab_size].astype(jnp.float32) / temperature
    logp = jax.nn.log_softmax(z, axis=-1)
    tok = jnp.take_along_axis(logp, ids[:, start:, None], axis=-1)[..., 0]
    if top_k == 0:
        return logp, None, None, tok
    lp, top = jax.lax.top_k(logp, top_k)
    return lp, top.astype(jnp.int32), jax.nn.logsumexp(lp, axis=-1), tok


class _TokenizerVocab(nnx.Module):
    """The decoder for sampling, with embedding-padding ids at -inf so generate never returns one."""

    def __init__(self, model: nnx.Module, vocab_size: int):
        self.model, self.config, self.vocab_size = model, model.config, vocab_size

    def init_cache(self, *args: Any, **kw: Any):
        return self.model.init_cache(*args, **kw)

    def forward_with_cache(self, *args: Any):
        logits, cache = self.model.forward_with_cache(*args)
        keep = jnp.arange(logits.shape[-1]) < self.vocab_size
        return jnp.where(keep, logits, -jnp.inf), cache


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


class JaxBackend(TeacherBackend):
    """Teacher scores from a gold_jax Decoder (CPU, GPU or TPU)."""

    def __init__(self, model: nnx.Module, tokenizer: Any, *, model_name: str = "teacher",
                 max_top_k: int = 1024, length_bucket: int = 16):
        self.model, self.tokenizer = model, tokenizer
        self.length_bucket = length_bucket
        cfg = model.config
        self._info = {"model_name": model_name, "vocab_size": tokenizer_size(tokenizer),
                      "embedding_size": cfg.vocab_size, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                      "max_length": cfg.max_position_embeddings,
                      "max_top_k": min(max_top_k, tokenizer_size(tokenizer)),
                      "cross_tokenizer": True}   # issue 15: scores text for a student of another tokenizer
        if self._info["vocab_size"] > cfg.vocab_size:
            raise ValueError(f"tokenizer has {self._info['vocab_size']} ids but the model only "
                             f"{cfg.vocab_size} embedding rows")
        graphdef, self._state = nnx.split(model)
        # H7: hidden states on the wire; the trainer checks its copy of the head against this checksum.
        from gold_jax.teacher.head import head_checksum, head_from_model
        self._head = head_from_model(model)
        self._info.update(hidden_size=cfg.hidden_size, head_checksum=head_checksum(*self._head))

        @partial(jax.jit, static_argnames=("start",))
        def hidden(state, ids, mask, *, start):
            h = nnx.merge(graphdef, state).hidden(ids, mask)[:, start - 1:-1]
            return h.astype(jnp.bfloat16)

        self._hidden = hidden

        @partial(jax.jit, static_argnames=("top_k", "start", "vocab_size"))
        def run(state, ids, mask, temperature, *, top_k, start, vocab_size):
            return score_from_hidden(nnx.merge(graphdef, state), ids, mask, temperature,
                                     top_k=top_k, start=start, vocab_size=vocab_size)

        self._run = run
        self._sampler = None

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str = "float32", **kw: Any) -> JaxBackend:
        from gold_jax.data import load_tokenizer
        from gold_jax.models.hf_io import load_pretrained
        name = kw.pop("model_name", os.path.basename(os.path.normpath(path)))
        # Weights too, not only the compute, in `dtype`: the teacher is never trained, and a 7B
        # teacher's weights take 14 GB in bfloat16 instead of 28 GB. Scores stay float32 (score_from_hidden).
        return cls(load_pretrained(path, dtype=dtype, param_dtype=dtype), load_tokenizer(path), model_name=name, **kw)

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, top_k: int,
              temperature: float, completion_start: int | None) -> TeacherScores:
        ids_p, mask_p, b, length, start = self._padded(input_ids, attention_mask, completion_start)
        out = self._run(self._state, ids_p, mask_p, jnp.float32(temperature), top_k=int(top_k),
                        start=start, vocab_size=self._info["vocab_size"])
        rows = length - start
        lp, top, mass, tok = (None if x is None else np.asarray(x)[:b, :rows] for x in out)
        return TeacherScores(logprobs=lp, ids=top, topk_logmass=mass, token_logprob=tok)

    def _padded(self, input_ids: np.ndarray, attention_mask: np.ndarray, completion_start: int | None):
        ids = np.asarray(input_ids, np.int32)
        mask = np.asarray(attention_mask, np.int32)
        b, length = ids.shape
        start = 1 if completion_start is None else int(completion_start)
        if not 1 <= start < length:
            raise ValueError(f"completion_start={completion_start} must be in [1, {length - 1}]")
        pb = 1 << max(0, (b - 1).bit_length())
        pl = _round_up(length, self.length_bucket)
        # Extra rows copy row 0 (an all-masked row could divide by zero); extra columns are masked.
        ids_p = np.zeros((pb, pl), np.int32)
        mask_p = np.zeros((pb, pl), np.int32)
        ids_p[:b, :length], mask_p[:b, :length] = ids, mask
        ids_p[b:, :length], mask_p[b:, :length] = ids[:1], mask[:1]
        return ids_p, mask_p, b, length, start

    def hidden(self, input_ids: np.ndarray, attention_mask: np.ndarray, *,
               completion_start: int | None) -> np.ndarray:
        ids_p, mask_p, b, length, start = self._padded(input_ids, attention_mask, completion_start)
        out = self._hidden(self._state, ids_p, mask_p, start=start)
        return np.asarray(out)[:b, :length - start]

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        return self._head

    def generate(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray, *, max_new_tokens: int,
                 temperature: float, top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> RolloutResult:
        if self._sampler is None:
            from gold_jax.rollout.jax_sampler import JaxSampler
            tok = self.tokenizer
            from gold_jax.data.special_tokens import EOS_ATTR
            # The whole EOS set (tokenizer + config/generation_config), as the student's rollout uses.
            eos = getattr(tok, EOS_ATTR, None) or (tok.eos_token_id if tok.eos_token_id is not None
                                                   else self.model.config.eos_token_id)
            first = eos[0] if isinstance(eos, (tuple, list)) else eos
            pad = tok.pad_token_id if tok.pad_token_id is not None else (first or 0)
            model = self.model
            if self._info["embedding_size"] > self._info["vocab_size"]:
                model = _TokenizerVocab(model, self._info["vocab_size"])
            self._sampler = JaxSampler(model, eos_id=eos, pad_id=pad)
        return self._sampler.generate(prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)

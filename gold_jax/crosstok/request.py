"""Cross-tokenizer scoring over the wire: what the client sends, what the teacher computes and returns.

Why text plus offsets: the teacher needs the *text* to tokenize with its own
tokenizer, and the student's token boundaries inside it to align. The client
has the student tokenizer, so it decodes each row once (prompt; completion with
every prefix, `align.token_bytes`) and sends the UTF-8 bytes with, per student
completion token, the byte offset where it ends (-1: inside a character, -2:
not scored). No tokenizer file, no pickle, and the request grows with the text
(a few bytes a token), not with a vocabulary.

The teacher side (`score_rows`, run by the worker) tokenizes the prompt with
its special tokens (its BOS, its own chat markers when their strings occur in
the text) and the completion without, scores the completion at the request's
temperature, decodes its own prefixes for its boundaries, aligns
(`align.align_offsets`, up to the first byte where the two texts differ) and
moves the top-k to student positions (`fields.student_fields`, TRL's observed /
bayesian merge as a log-scale). Ids stay in the teacher's vocabulary: the
client maps them with the `VocabMap` it built once from the `vocab` op.
Every scored student position is either in a span or counted as unaligned
(`gold/unaligned_frac`); skipped EOS positions (TRL's uld_skip_*_eos) are not
scored at all.

Limits: the prompt keeps the student's chat-template markers as text (the
token ids carry no messages to re-render with the teacher's template); a
decoder that drops a leading space of a completion decoded alone drops it on
both sides alike.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from gold_jax.crosstok.align import align_offsets, token_bytes
from gold_jax.crosstok.fields import student_fields

NOT_SCORED = -2   # student_ends value of a position the loss skips (padding, a skipped EOS)


def backend_tokenizer(tok: Any) -> Any:
    """The `tokenizers.Tokenizer` under a transformers fast tokenizer (decode_batch/encode), or `tok` itself."""
    return getattr(tok, "backend_tokenizer", tok)


# ------------------------------------------------------------------ client side

def student_request(tokenizer: Any, prompt_ids: np.ndarray, prompt_mask: np.ndarray, completion_ids: np.ndarray,
                    completion_mask: np.ndarray, *, eos_ids: Sequence[int] = (),
                    skip_eos: bool = True) -> dict[str, np.ndarray]:
    """Arrays of a cross score request (protocol._cross_score) for one batch of student rows.

    Completion positions with mask 0, and with `skip_eos` those holding a student EOS id, get
    NOT_SCORED; the text of a row is the decoded scored tokens (specials kept as text).
    """
    dec = backend_tokenizer(tokenizer)
    bos = getattr(tokenizer, "bos_token", None)
    eos = np.asarray(sorted(set(int(i) for i in eos_ids)), np.int64)
    b, r = completion_ids.shape
    ends = np.full((b, r), NOT_SCORED, np.int32)
    offsets = np.zeros((b, 2), np.int32)
    chunks: list[bytes] = []
    for i in range(b):
        p = [int(t) for t in prompt_ids[i][prompt_mask[i] == 1]]
        ptext = dec.decode(p, skip_special_tokens=False) if p else ""
        if bos and ptext.startswith(bos):   # the teacher adds its own BOS (if it uses one)
            ptext = ptext[len(bos):]
        scored = np.asarray(completion_mask[i]) == 1
        if skip_eos and len(eos):
            scored &= ~np.isin(completion_ids[i], eos)
        pos = np.nonzero(scored)[0]
        tb = token_bytes(dec, [int(t) for t in completion_ids[i][pos]])
        ends[i, pos] = tb.ends
        pb, cb = ptext.encode("utf-8"), tb.text.encode("utf-8")
        offsets[i] = (len(pb), len(cb))
        chunks += [pb, cb]
    return {"text": np.frombuffer(b"".join(chunks), np.uint8).copy(), "text_offsets": offsets, "student_ends": ends}


# ------------------------------------------------------------------ teacher side

def _encode(dec: Any, text: str, special: bool) -> list[int]:
    return list(dec.encode(text, add_special_tokens=special).ids) if text else []


def score_rows(backend: Any, tokenizer: Any, pieces: Sequence[tuple[str, str]], student_ends: np.ndarray, *,
               top_k: int, temperature: float, strategy: str, skip_teacher_eos: bool, eos_ids: Sequence[int],
               max_length: int) -> dict[str, np.ndarray]:
    """The cross reply arrays (protocol.CROSS_REPLY) for rows of (prompt text, completion text).

    One backend call for all rows: prompts left-padded to the longest, completions right-padded,
    scored from the completion's first position (the gold_jax.types layout, in teacher tokens).
    """
    dec = backend_tokenizer(tokenizer)
    b, r = student_ends.shape
    prompts = [_encode(dec, p, True) for p, _ in pieces]
    comps = [_encode(dec, c, False) for _, c in pieces]
    pt, rt = max(map(len, prompts)), max(1, max(map(len, comps)))
    if pt == 0:
        raise ValueError("every prompt is empty in the teacher's tokenization: nothing to condition on")
    if pt + rt > max_length:
        raise ValueError(f"the teacher's tokenization needs {pt} prompt + {rt} completion tokens, more than its "
                         f"max_length {max_length}: lower data.max_prompt_length / data.max_response_length")
    pad = int(getattr(tokenizer, "pad_token_id", None) or 0)
    ids = np.full((b, pt + rt), pad, np.int32)
    mask = np.zeros((b, pt + rt), np.int32)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        ids[i, pt - len(p):pt], mask[i, pt - len(p):pt] = p, 1
        ids[i, pt:pt + len(c)], mask[i, pt:pt + len(c)] = c, 1
    s = backend.score(ids, mask, top_k=top_k, temperature=temperature, completion_start=pt)
    out = {"logprobs": np.zeros((b, r, top_k), np.float32), "ids": np.full((b, r, top_k), -1, np.int32),
           "topk_logmass": np.zeros((b, r), np.float32), "logscale": np.zeros((b, r), np.float32),
           "span_id": np.full((b, r), -1, np.int32), "span_base": np.zeros((b, r), np.int32),
           "loss_mask": np.zeros((b, r), np.float32),
           "unaligned": np.zeros(b, np.int32), "scored": np.zeros(b, np.int32)}
    eos = set(int(e) for e in eos_ids) if skip_teacher_eos else set()
    for i, ((_, ctext), c) in enumerate(zip(pieces, comps)):
        pos = np.nonzero(student_ends[i] != NOT_SCORED)[0]
        n_t = len(c)
        tb = token_bytes(dec, c)
        s_raw, t_raw = ctext.encode("utf-8"), tb.text.encode("utf-8")
        n = min(len(s_raw), len(t_raw))
        diff = next((j for j in range(n) if s_raw[j] != t_raw[j]), n)
        al = align_offsets(student_ends[i, pos], tb.ends, diff)
        f = student_fields(al, None, np.asarray(s.logprobs[i, :n_t]), np.asarray(s.ids[i, :n_t]),
                           np.asarray(s.topk_logmass[i, :n_t]), np.asarray(s.token_logprob[i, :n_t]), strategy)
        skipped = np.zeros(len(pos), bool)
        for k, (s0, s1, t0, t1, _, _) in enumerate(al.spans):
            if eos and any(int(t) in eos for t in c[t0:t1]):   # TRL's uld_skip_teacher_eos: not in the loss
                skipped[s0:s1] = True
                f["loss_mask"][s0:s1] = 0.0
        for name, src in (("logprobs", "teacher_logprobs"), ("topk_logmass", "teacher_logmass"),
                          ("logscale", "teacher_logscale"), ("span_id", "span_id"), ("loss_mask", "loss_mask")):
            out[name][i, pos] = f[src]
        out["ids"][i, pos] = f["teacher_student_ids"]
        out["span_base"][i, pos] = f["span_base"]
        out["unaligned"][i] = al.n_unaligned_student
        out["scored"][i] = len(pos) - int(skipped.sum())
    return out


def vocab_map_for(student_tokenizer: Any, teacher_vocab: dict[str, int], *, student_vocab_size: int,
                  teacher_vocab_size: int) -> Any:
    """The exact-string VocabMap (built once per run from the teacher's `vocab` reply)."""
    from gold_jax.crosstok.vocab_map import shared_vocab
    t_size = max(int(teacher_vocab_size), max(teacher_vocab.values(), default=-1) + 1)
    return shared_vocab(student_tokenizer, teacher_vocab, student_vocab_size=student_vocab_size,
                        teacher_vocab_size=t_size)


# ------------------------------------------------------------------ the run's settings, client side

@dataclasses.dataclass(frozen=True, eq=False)
class CrossSpec:
    """What a client needs to ask for cross scores: the student tokenizer, the run's VocabMap (built once
    from the teacher's `vocab` reply) and TRL's uld_* switches. `key()` enters the score cache's keys."""
    tokenizer: Any
    vocab_map: Any
    eos_ids: tuple[int, ...]
    strategy: str = "observed"
    skip_student_eos: bool = True
    skip_teacher_eos: bool = True
    student_fingerprint: str = ""

    def key(self) -> str:
        return (f"cross|{self.student_fingerprint}|{self.strategy}|{int(self.skip_student_eos)}|"
                f"{int(self.skip_teacher_eos)}")

    def request(self, seq: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(args, arrays) of the score request for a SequenceBatch."""
        arrays = student_request(self.tokenizer, seq.prompt_ids, seq.prompt_mask, seq.completion_ids,
                                 seq.completion_mask, eos_ids=self.eos_ids, skip_eos=self.skip_student_eos)
        return {"signal": "cross", "strategy": self.strategy, "skip_teacher_eos": self.skip_teacher_eos}, arrays

    def to_student_ids(self, scores: Any) -> Any:
        """The reply's teacher top-k ids mapped into the student vocabulary (-1: no twin)."""
        return dataclasses.replace(scores, ids=self.vocab_map.map_ids(scores.ids))


def loss_settings(gold: Any, vocab_map: Any) -> dict[str, Any]:
    """LossSpec fields of a cross-tokenizer run from config.gold (TRL's uld_* keys) and the run's VocabMap."""
    from gold_jax.losses.uld import hybrid_weights
    wm, wu = hybrid_weights(vocab_map.n_matched, vocab_map.teacher_vocab_size, gold.uld_hybrid_matched_weight,
                            gold.uld_hybrid_unmatched_weight)
    return dict(uld_hybrid=bool(gold.uld_use_hybrid_loss), uld_matched_weight=wm, uld_unmatched_weight=wu,
                uld_crossentropy_weight=float(gold.uld_crossentropy_weight),
                uld_distillation_weight=float(gold.uld_distillation_weight),
                uld_student_temperature=float(gold.uld_student_temperature),
                student_shared=np.packbits(np.asarray(vocab_map.student_shared, bool)).tobytes())

"""The vocabulary two tokenizers share, matched by exact token string (TRL GOLD's hybrid-loss map).

Computed once per run from both vocabularies (added/special tokens included):
`teacher_to_student[t]` is the student id of the teacher token with the same
string, or -1. Byte-level and byte-fallback vocabularies spell the same bytes
differently ("Ġ" vs "▁"), so they share little under this rule: as in TRL, the
shared part gets the JSD and the rest the sorted (ULD) comparison.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class VocabMap:
    teacher_to_student: np.ndarray  # int32 [V_teacher], -1 where the teacher token has no student twin
    student_shared: np.ndarray      # bool [V_student]: the student token has a teacher twin
    teacher_vocab_size: int
    student_vocab_size: int

    @property
    def n_matched(self) -> int:
        return int(np.sum(self.teacher_to_student >= 0))

    def adaptive_weights(self) -> tuple[float, float]:
        """TRL's weights when uld_hybrid_*_weight are None: matched = shared / teacher vocab, unmatched = 1 - that."""
        w = self.n_matched / max(1, self.teacher_vocab_size)
        return w, 1.0 - w

    def map_ids(self, teacher_ids: np.ndarray) -> np.ndarray:
        """Teacher ids (any shape) -> student ids, -1 where unmatched or out of range."""
        ids = np.asarray(teacher_ids)
        ok = (ids >= 0) & (ids < self.teacher_vocab_size)
        return np.where(ok, self.teacher_to_student[np.where(ok, ids, 0)], -1).astype(np.int32)


def _vocab(tok) -> dict[str, int]:
    """token string -> id from a `tokenizers.Tokenizer`, a transformers tokenizer, or a plain mapping."""
    if isinstance(tok, Mapping):
        return dict(tok)
    try:
        return dict(tok.get_vocab(with_added_tokens=True))
    except TypeError:  # transformers' get_vocab() takes no argument and includes added tokens
        return dict(tok.get_vocab())


def _size(vocab: dict[str, int], size: int | None) -> int:
    n = max(vocab.values(), default=-1) + 1
    if size is not None and size < n:
        raise ValueError(f"vocab size {size} is smaller than the largest token id + 1 ({n})")
    return n if size is None else int(size)


def shared_vocab(student, teacher, *, student_vocab_size: int | None = None,
                 teacher_vocab_size: int | None = None) -> VocabMap:
    """Exact-string map between two vocabularies; sizes default to the largest id + 1 (pass the model's
    padded embedding sizes to cover padding rows, which stay unmatched)."""
    sv, tv = _vocab(student), _vocab(teacher)
    n_s, n_t = _size(sv, student_vocab_size), _size(tv, teacher_vocab_size)
    t2s = np.full(n_t, -1, np.int32)
    shared = np.zeros(n_s, bool)
    for string, t_id in tv.items():
        s_id = sv.get(string)
        if s_id is not None:
            t2s[t_id] = s_id
            shared[s_id] = True
    if len(np.unique(t2s[t2s >= 0])) != int(np.sum(t2s >= 0)):
        raise ValueError("two teacher tokens map to one student id: a vocabulary has duplicate ids")
    return VocabMap(t2s, shared, n_t, n_s)

"""Tokenizer fingerprints: teacher and student must share a vocabulary, not just a size.

Only the vocabulary (id -> piece) decides. Special-token roles (eos, pad) may
differ between checkpoints of one family, e.g. Qwen2.5 Base (<|endoftext|>) vs
Instruct (<|im_end|>): the teacher scores the same ids either way, and the
student's EOS set is the one that ends completions. Such a difference is a
warning (`compare_tokenizers`), not a refusal.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the id -> piece table (added and special tokens included as pieces).

    Two checkpoints that share a tokenizer but pad their embedding matrices to
    different sizes (Qwen2.5 0.5B: 151936 rows, 7B: 152064) get the same
    fingerprint; the embedding size is not part of it, nor are the special-token roles.
    """
    vocab = tokenizer.get_vocab()
    payload = json.dumps(sorted(((i, t) for t, i in vocab.items())), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def tokenizer_size(tokenizer: Any) -> int:
    """Number of ids the tokenizer can produce (ids >= this are embedding padding)."""
    return len(tokenizer.get_vocab())


def _roles(tokenizer: Any) -> dict[str, str | None]:
    return {r: (str(getattr(tokenizer, r)) if getattr(tokenizer, r, None) is not None else None) for r in ROLES}


def compare_tokenizers(student: Any, teacher: Any, max_ids: int = 5) -> list[str]:
    """Warnings for special-token role differences; ValueError saying exactly how the vocabularies differ."""
    sv = {i: t for t, i in student.get_vocab().items()}
    tv = {i: t for t, i in teacher.get_vocab().items()}
    if sv != tv:
        parts = []
        if len(sv) != len(tv):
            parts.append(f"sizes differ: student {len(sv)} ids, teacher {len(tv)}")
        diff = sorted(i for i in set(sv) | set(tv) if sv.get(i) != tv.get(i))
        shown = ", ".join(f"{i}: student {sv.get(i)!r} vs teacher {tv.get(i)!r}" for i in diff[:max_ids])
        parts.append(f"{len(diff)} ids differ, first {shown}")
        sr, tr = _roles(student), _roles(teacher)
        if sr != tr:
            parts.append(f"special tokens: student {sr}, teacher {tr}")
        raise ValueError("teacher and student tokenizers have different vocabularies (" + "; ".join(parts)
                         + "); the teacher's scores would refer to other tokens")
    warnings = []
    sr, tr = _roles(student), _roles(teacher)
    for r in ROLES:
        if sr[r] != tr[r]:
            warnings.append(f"teacher {r} {tr[r]!r} differs from the student's {sr[r]!r} (same vocabulary; "
                            "the student's EOS set ends completions)")
    return warnings

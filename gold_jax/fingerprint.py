"""Tokenizer fingerprints: teacher and student must share a vocabulary, not just a size."""
from __future__ import annotations

import hashlib
import json
from typing import Any


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the token -> id table and the special tokens.

    Two checkpoints that share a tokenizer but pad their embedding matrices to
    different sizes (Qwen2.5 0.5B: 151936 rows, 7B: 152064) get the same
    fingerprint; the embedding size is not part of it.
    """
    vocab = tokenizer.get_vocab()
    special = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    payload = json.dumps({"vocab": sorted(vocab.items(), key=lambda kv: kv[1]), "special": special},
                         ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def tokenizer_size(tokenizer: Any) -> int:
    """Number of ids the tokenizer can produce (ids >= this are embedding padding)."""
    return len(tokenizer.get_vocab())

"""A small ChatML tokenizer for tests, trained once and cached on disk.

Usage from any test:  `from tiny_tokenizer import tiny_tokenizer, tiny_tokenizer_dir`
(tests/ is on sys.path under pytest's rootdir-relative imports).
"""
from __future__ import annotations

import functools
import hashlib
import os
import random
import shutil
import tempfile

from gold_jax.data.tokenizer import load_tokenizer, train_tokenizer

_WORDS = ("the a an of to and in is was for on that with as by it at from this be are or "
          "one two three four five six seven eight nine ten plus minus times equals answer "
          "question what how why who where when number sum total result step first then so "
          "hello world model student teacher learns stop user assistant system think").split()


def tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Deterministic English-like lines with digits and punctuation."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        words.insert(rng.randint(0, len(words)), str(rng.randint(0, 999)))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ","]))
    return lines


def tiny_tokenizer_dir(vocab_size: int = 512) -> str:
    """Directory holding a saved tiny tokenizer (trained on first use, then reused)."""
    key = hashlib.sha256(f"v1|{vocab_size}".encode()).hexdigest()[:12]
    root = os.environ.get("GOLD_JAX_TEST_TOKENIZER_DIR", tempfile.gettempdir())
    path = os.path.join(root, f"gold_jax_tiny_tokenizer_{key}")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        # Write to a private dir and rename so concurrent test processes never see half a tokenizer.
        tmp = tempfile.mkdtemp(prefix="gold_jax_tok_", dir=root)
        train_tokenizer(tiny_corpus(), vocab_size, out_dir=tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 512):
    """The cached tiny tokenizer (PreTrainedTokenizerFast); eos <|im_end|>, pad <|pad|>."""
    return load_tokenizer(tiny_tokenizer_dir(vocab_size))

"""The demo's synthetic task: sort a list of digits, answer checked exactly.

Sorting is learnt by a tiny transformer in a minute or two of CPU, has one
verifiable answer per prompt, and its difficulty is tuned by the list length,
which leaves room between a small warmed-up student and a trained teacher.
Rows follow verl's gsm8k preprocessing (prompt as chat messages, answer in
reward_model.ground_truth) plus the completion in a "response" column.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

DATA_SOURCE = "gold_jax/sort_digits"
INSTRUCTION = "Sort:"
_ANSWER_RE = re.compile(r"^[0-9](?: [0-9])*$")


def format_prompt(digits: Sequence[int]) -> str:
    return f"{INSTRUCTION} " + " ".join(str(int(d)) for d in digits)


def solve(digits: Sequence[int]) -> str:
    """The ground-truth completion: the digits sorted ascending, space separated."""
    return " ".join(str(int(d)) for d in sorted(digits))


def make_row(digits: Sequence[int], split: str, index: int) -> dict[str, Any]:
    answer = solve(digits)
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": format_prompt(digits)}],
        "response": answer,
        "ability": "sorting",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": split, "index": int(index)},
    }


def make_splits(n_train: int, n_val: int, *, min_len: int = 4, max_len: int = 6,
                seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train/validation rows: no validation digit list appears in train."""
    if min(n_train, n_val) < 0:
        raise ValueError(f"n_train={n_train}, n_val={n_val}: counts must be >= 0")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"min_len={min_len}, max_len={max_len}: need 1 <= min_len <= max_len")
    space = sum(10 ** k for k in range(min_len, max_len + 1))
    if n_train + n_val > space // 2:
        raise ValueError(f"n_train + n_val = {n_train + n_val} is too many for lists of "
                         f"{min_len}..{max_len} digits ({space} possible)")
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, ...]] = set()
    out: list[list[dict]] = [[], []]
    for which, (split, n) in enumerate((("validation", n_val), ("train", n_train))):
        while len(out[which]) < n:
            length = int(rng.integers(min_len, max_len + 1))
            digits = tuple(int(d) for d in rng.integers(0, 10, size=length))
            if digits in seen:
                continue
            seen.add(digits)
            out[which].append(make_row(digits, split, len(out[which])))
    val, train = out
    return train, val


def ground_truth(row: Mapping[str, Any]) -> str:
    try:
        return str(row["reward_model"]["ground_truth"])
    except (KeyError, TypeError) as e:
        raise ValueError("prompt_row needs reward_model.ground_truth "
                         f"(verl format); got keys {sorted(row) if isinstance(row, Mapping) else type(row)}") from e


def extract_answer(completion_text: str) -> str:
    """The answer part of a completion: text before the first end-of-turn marker, whitespace-normalised."""
    if not isinstance(completion_text, str):
        raise TypeError(f"completion_text must be str, got {type(completion_text).__name__}")
    text = completion_text.split("<|im_end|>")[0].split("<|endoftext|>")[0]
    return " ".join(text.split())


def score_completion(prompt_row: Mapping[str, Any], completion_text: str) -> bool:
    """Exact match of the completion's answer with the row's ground truth."""
    return extract_answer(completion_text) == " ".join(ground_truth(prompt_row).split())


def is_well_formed(completion_text: str) -> bool:
    """True when the answer is a space-separated digit list (a format check, not correctness)."""
    return bool(_ANSWER_RE.match(extract_answer(completion_text)))


def tokenizer_corpus(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Texts to train the demo tokenizer on: every prompt and response."""
    texts = ["user\n", "assistant\n", "system\n"]  # chat-template role names become single tokens
    for row in rows:
        texts.extend(m["content"] for m in row["prompt"])
        texts.append(row["response"])
    return texts

"""The second demo task ("chain"): a chain of modular arithmetic where on-policy data should matter.

Why this task (issue 18). On the sorting task off-policy distillation (lmbda 0)
beat on-policy (lmbda 1), the opposite of the GKD paper. Sorting answers are
9-16 tokens, so a student's early mistake barely compounds, and the dataset's
completions are exactly what the teacher would write. This task is designed,
before any study was run on it, to remove both reasons and to widen the
capacity gap:

* Long generations where one early error derails the rest. A prompt is a
  program of 8 steps (build.PRESETS["chain-full"]), ``Run: a=7 b=*3 c=+4 d=*9 ...``:
  variable ``a`` is a digit and every later variable applies one operation
  (``+k``, k in 1..9, or ``*k``, k in {3, 7, 9}) to the previous variable,
  modulo 10. Every operation is a bijection of Z/10, so a single wrong
  intermediate value makes the final answer wrong (unless a second error
  happens to cancel it): errors compound through the whole chain, and a
  student that has drifted off its track is in states that the dataset never
  shows it.
* Dataset completions written in a different scratchpad style from the
  teacher's. Both are worked, correct, the same length (7 tokens a step: 58
  tokens + EOS for 8 steps) and end in the same final answer, `` ans <d>``:

    style A (the teacher's: the running value first):
        ``b=7*3=1 c=1+4=5 d=5*9=5 ... ans 4``
    style B (the dataset's: the operand first):
        ``b=3*7=1 c=4+1=5 d=9*5=5 ... ans 4``

  The teacher is trained on style A only; the student is carved out of the
  teacher (below) and warmed up on style A, so its own samples are on the
  teacher's distribution, while the parquet's ``response`` column (what
  off-policy steps train on) is style B: off the teacher's distribution as
  well as the student's. Style A is kept in the ``response_teacher_style``
  column, so a control run can distil off-policy on the teacher's own style
  (``--config.data.response_key=response_teacher_style``). Exact match checks
  the final answer only, so both styles score as correct.
* A capacity gap. Each step is a lookup (the variable's letter -> its
  operation in the prompt, an induction pattern) plus a 120-entry table. The
  teacher (2 layers, 4 heads, 367k parameters) learns it; the student is the
  teacher pruned to 3 of 4 heads and 16 of 256 MLP neurons per layer
  (prune.py, Minitron-style: 150k parameters, 41%), then warmed up only until
  it solves a quarter of the prompts, so it keeps part of the teacher's
  circuits and makes its own mistakes. A student of that size trained from
  scratch had not left chance level after 500 SFT steps, far beyond the build
  budget; one pruned to 2 heads had not recovered after 75 steps.

Sizing (2-core CPU, build under 5 minutes): the first version of this task
had 12 steps in a compact teacher style (``b=1 c=5 ...``, 38 tokens, under the
issue's 48) and a teacher that needed 900 SFT steps (an hour of building under
load). The worked style makes each step local (the running value is copied,
then the operation, then the table lookup), so the teacher learns 8 steps (58
tokens) in about 300 steps of batch 64; the functions here take any length up
to 25 steps.

What we expect (written before the study): lmbda 1 ahead of lmbda 0 at every
beta, because off-policy batches ask the teacher for next-token distributions
on style-B text it has never seen. If the study says otherwise, the README says
so; the task is not tuned after the fact.

Rows follow verl's format like the sorting task (prompt as chat messages,
answer in reward_model.ground_truth) plus the completion in a "response" column.
"""
from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from gold_jax.demo.task import ground_truth  # the same verl reward_model field

DATA_SOURCE = "gold_jax/chain_mod10"
VERSION = 2                  # 1: 12 steps, compact teacher style (benchmarks/results/distill_study_chain_v1.md)
INSTRUCTION = "Run:"
TEACHER_STYLE_KEY = "response_teacher_style"   # style A, next to the dataset's style-B "response"
STYLES = ("A", "B")
ADD_KS = tuple(range(1, 10))
MUL_KS = (3, 7, 9)           # units of Z/10: every operation is a bijection, so errors never vanish
MAX_STEPS = 25               # letters b..z
MAX_NEW_TOKENS = 72          # evaluation: either style of 8 steps is 58 tokens + EOS
_ANS_RE = re.compile(r"(?:^|\s)ans\s+([0-9])\s*$")
_OP_RE = re.compile(r"([a-z])=([+*])([0-9])")

Op = tuple[str, int]         # ("+", 4) or ("*", 3)


def apply(op: Op, x: int) -> int:
    kind, k = op
    if kind == "+":
        return (x + k) % 10
    if kind == "*":
        return (x * k) % 10
    raise ValueError(f"unknown operation {kind!r}")


def values(start: int, ops: Sequence[Op]) -> list[int]:
    """The chain's values: a, then one per operation."""
    out = [int(start)]
    for op in ops:
        out.append(apply(op, out[-1]))
    return out


def _check_program(start: int, ops: Sequence[Op]) -> None:
    if not 0 <= int(start) <= 9:
        raise ValueError(f"start must be a digit, got {start!r}")
    if not 1 <= len(ops) <= MAX_STEPS:
        raise ValueError(f"a program has 1..{MAX_STEPS} operations, got {len(ops)}")
    for kind, k in ops:
        if (kind, k) not in [("+", a) for a in ADD_KS] + [("*", m) for m in MUL_KS]:
            raise ValueError(f"operation {kind}{k} is not one of +1..+9, *3, *7, *9")


def format_prompt(start: int, ops: Sequence[Op]) -> str:
    _check_program(start, ops)
    letters = string.ascii_lowercase
    return f"{INSTRUCTION} a={int(start)} " + " ".join(
        f"{letters[i + 1]}={kind}{k}" for i, (kind, k) in enumerate(ops))


def parse_prompt(text: str) -> tuple[int, list[Op]]:
    """(start, operations) of a prompt written by format_prompt."""
    m = re.match(rf"^{re.escape(INSTRUCTION)} a=([0-9])((?: [a-z]=[+*][0-9])+)$", text.strip())
    if not m:
        raise ValueError(f"not a chain prompt: {text!r}")
    ops = [(kind, int(k)) for _, kind, k in _OP_RE.findall(m.group(2))]
    return int(m.group(1)), ops


def solve(start: int, ops: Sequence[Op], style: str = "A") -> str:
    """A correct completion in style A (the teacher's) or B (the dataset's); both end in ``ans <d>``."""
    _check_program(start, ops)
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    vals, letters = values(start, ops), string.ascii_lowercase
    if style == "A":    # the running value first: b=7*3=1
        steps = [f"{letters[i + 1]}={vals[i]}{kind}{k}={vals[i + 1]}" for i, (kind, k) in enumerate(ops)]
    else:               # the operand first: b=3*7=1 (both operations commute)
        steps = [f"{letters[i + 1]}={k}{kind}{vals[i]}={vals[i + 1]}" for i, (kind, k) in enumerate(ops)]
    return " ".join(steps) + f" ans {vals[-1]}"


def make_row(start: int, ops: Sequence[Op], split: str, index: int) -> dict[str, Any]:
    answer = str(values(start, ops)[-1])
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": format_prompt(start, ops)}],
        "response": solve(start, ops, "B"),          # the dataset: off the teacher's style
        TEACHER_STYLE_KEY: solve(start, ops, "A"),
        "ability": "arithmetic",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": split, "index": int(index)},
    }


def _random_ops(rng: np.random.Generator, n: int) -> list[Op]:
    ops: list[Op] = []
    for _ in range(n):
        if rng.random() < 0.5:
            ops.append(("+", int(rng.choice(ADD_KS))))
        else:
            ops.append(("*", int(rng.choice(MUL_KS))))
    return ops


def make_splits(n_train: int, n_val: int, *, min_len: int = 8, max_len: int = 8,
                seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train/validation rows (no validation program appears in train); lengths = operations."""
    if min(n_train, n_val) < 0:
        raise ValueError(f"n_train={n_train}, n_val={n_val}: counts must be >= 0")
    if not 1 <= min_len <= max_len <= MAX_STEPS:
        raise ValueError(f"min_len={min_len}, max_len={max_len}: need 1 <= min_len <= max_len <= {MAX_STEPS}")
    space = 10 * 12 ** min_len
    if n_train + n_val > space // 2:
        raise ValueError(f"n_train + n_val = {n_train + n_val} is too many for programs of {min_len} steps")
    rng = np.random.default_rng(seed)
    seen: set[tuple] = set()
    out: list[list[dict]] = [[], []]
    for which, (split, n) in enumerate((("validation", n_val), ("train", n_train))):
        while len(out[which]) < n:
            start = int(rng.integers(0, 10))
            ops = _random_ops(rng, int(rng.integers(min_len, max_len + 1)))
            key = (start, tuple(ops))
            if key in seen:
                continue
            seen.add(key)
            out[which].append(make_row(start, ops, split, len(out[which])))
    val, train = out
    return train, val


def extract_answer(completion_text: str) -> str | None:
    """The final answer: the digit after the last ``ans`` at the end of the completion, else None."""
    if not isinstance(completion_text, str):
        raise TypeError(f"completion_text must be str, got {type(completion_text).__name__}")
    text = completion_text.split("<|im_end|>")[0].split("<|endoftext|>")[0]
    m = _ANS_RE.search(text)
    return m.group(1) if m else None


def score_completion(prompt_row: Mapping[str, Any], completion_text: str) -> bool:
    """Exact match of the final answer only (the scratchpad's style is free)."""
    return extract_answer(completion_text) == ground_truth(prompt_row).strip()


def is_well_formed(completion_text: str) -> bool:
    """True when the completion ends in ``ans <digit>`` (a format check, not correctness)."""
    return extract_answer(completion_text) is not None


def tokenizer_corpus(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Texts to train the tokenizer on: every prompt and both completion styles."""
    texts = ["user\n", "assistant\n", "system\n"]
    for row in rows:
        texts.extend(m["content"] for m in row["prompt"])
        texts.append(row["response"])
        texts.append(row[TEACHER_STYLE_KEY])
    return texts

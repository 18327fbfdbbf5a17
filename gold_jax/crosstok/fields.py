"""Per-student-position teacher fields for the cross-tokenizer losses, from an alignment.

The teacher scores its own tokenization of the text; this module moves its
top-k to the student positions that carry each span's loss (`span_arrays`),
translates the ids into the student vocabulary (`VocabMap`; -1 = no twin) and
folds TRL's span merge into one log-scale per position: the sum of the
teacher's (clamped) log-probs of its actual tokens at the span's other
positions. Positions that carry no loss (inside a span, or unaligned) get
loss_mask 0; the unaligned ones are counted for `gold/unaligned_frac`.

Host-side numpy: this is the step the server (or the client, from the
teacher's per-position results) runs once per scored sequence.
"""
from __future__ import annotations

import math

import numpy as np

from gold_jax.crosstok.align import Alignment, span_arrays
from gold_jax.crosstok.vocab_map import VocabMap

MERGE_MIN_LOGPROB = math.log(1e-8)  # TRL's clamp of each merged probability (as gold_jax.losses.uld)
FIELDS = ("teacher_logprobs", "teacher_student_ids", "teacher_logmass", "teacher_logscale", "span_id", "span_base",
          "loss_mask")


def student_fields(al: Alignment, vm: VocabMap | None, teacher_logprobs: np.ndarray, teacher_ids: np.ndarray,
                   teacher_logmass: np.ndarray, teacher_token_logprobs: np.ndarray,
                   strategy: str = "observed") -> dict[str, np.ndarray]:
    """Arrays [n_student(, k)] for one sequence (see FIELDS).

    vm None keeps the teacher's own ids in "teacher_student_ids" (the server side:
    the client maps them with its VocabMap, gold_jax.crosstok.request).
    teacher_logprobs / teacher_ids [n_teacher, k]: the teacher's top-k at each of
    its positions (position j predicts teacher token j); teacher_logmass
    [n_teacher]; teacher_token_logprobs [n_teacher]: log-prob of the actual
    teacher token j at position j (same temperature).
    """
    n_t, k = np.shape(teacher_logprobs)
    if n_t != al.n_teacher or np.shape(teacher_token_logprobs) != (n_t,) or np.shape(teacher_logmass) != (n_t,):
        raise ValueError(f"teacher arrays cover {n_t} positions, the alignment {al.n_teacher}")
    sa = span_arrays(al, strategy)
    n = al.n_student
    out = {
        "teacher_logprobs": np.zeros((n, k), np.float32),
        "teacher_student_ids": np.full((n, k), -1, np.int32),
        "teacher_logmass": np.zeros(n, np.float32),
        "teacher_logscale": np.zeros(n, np.float32),
        "span_id": sa.span_id.astype(np.int32),
        "span_base": sa.base.copy(),
        "loss_mask": sa.base.astype(np.float32),
    }
    clamped = np.maximum(np.asarray(teacher_token_logprobs, np.float64), MERGE_MIN_LOGPROB)
    for r in np.nonzero(sa.base)[0]:
        tb = sa.teacher_base[r]
        out["teacher_logprobs"][r] = teacher_logprobs[tb]
        t_ids = np.asarray(teacher_ids[tb])
        out["teacher_student_ids"][r] = t_ids if vm is None else vm.map_ids(t_ids)
        out["teacher_logmass"][r] = teacher_logmass[tb]
        out["teacher_logscale"][r] = clamped[list(sa.teacher_scalar_pos[sa.span_id[r]])].sum()
    return out


def pad_rows(rows: list[dict[str, np.ndarray]], length: int) -> dict[str, np.ndarray]:
    """Stack per-sequence fields into [B, length(, k)], padding with masked positions; longer rows are an error."""
    if any(len(r["loss_mask"]) > length for r in rows):
        raise ValueError(f"a sequence has more than {length} completion positions")
    fill = {"teacher_student_ids": -1, "span_id": -1}
    out = {}
    for name in FIELDS:
        parts = []
        for r in rows:
            a = r[name]
            pad = [(0, length - a.shape[0])] + [(0, 0)] * (a.ndim - 1)
            parts.append(np.pad(a, pad, constant_values=fill.get(name, 0)))
        out[name] = np.stack(parts)
    return out

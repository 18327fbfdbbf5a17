"""Host-side containers shared by data, rollout, teacher and trainer.

Layout convention (everything else relies on it):
- prompts are LEFT-padded to a bucket length P, completions RIGHT-padded to R,
  so the model input is concat(prompt, completion) of length P + R and the
  completion always starts at column P;
- the distribution that predicts completion token j sits at input position
  P - 1 + j, so teacher scores and student logits for the loss are taken at
  positions [P - 1, P + R - 1) and have a length axis of R.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class SequenceBatch:
    prompt_ids: np.ndarray        # [B, P] int32, left-padded
    prompt_mask: np.ndarray       # [B, P] int32, 1 on real prompt tokens
    completion_ids: np.ndarray    # [B, R] int32, right-padded
    completion_mask: np.ndarray   # [B, R] int32, 1 on completion tokens that enter the loss (EOS included)

    @property
    def completion_start(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def input_ids(self) -> np.ndarray:
        return np.concatenate([self.prompt_ids, self.completion_ids], axis=1)

    @property
    def attention_mask(self) -> np.ndarray:
        return np.concatenate([self.prompt_mask, self.completion_mask], axis=1)


@dataclasses.dataclass
class RolloutResult(SequenceBatch):
    logprobs: np.ndarray | None = None       # [B, R] float32, sampling log-probs of completion tokens
    finish_reason: np.ndarray | None = None  # [B] int32: 0 = EOS, 1 = length


FINISH_EOS, FINISH_LENGTH = 0, 1


@dataclasses.dataclass
class TeacherScores:
    """Teacher distributions at temperature T for the R completion positions."""
    logprobs: np.ndarray               # [B, R, k] float32 top-k log-probs; [B, R, V] when full rows (top_k=0)
    ids: np.ndarray | None             # [B, R, k] int32 top-k token ids; None for full rows
    topk_logmass: np.ndarray | None    # [B, R] float32 exact log of the top-k set's total mass; None for full rows
    token_logprob: np.ndarray          # [B, R] float32 log-prob of the completion token that actually follows
    # H7: signal "hidden": [B, R, H] bfloat16 final normed hidden states (logprobs, ids, token_logprob None);
    # a colocated teacher sends nothing at all (every field None: the train step runs it).
    hidden: np.ndarray | None = None
    # H10 (issue 15), signal "cross": the teacher's top-k aligned to the student's tokens. logprobs/ids/topk_logmass
    # sit at student positions (ids: the student ids of the teacher's top-k, -1 without a twin; token_logprob None);
    # this dict holds logscale/span_id/loss_mask [B, R] and unaligned/scored [B] (gold_jax.crosstok.request).
    cross: dict | None = None

"""Batch production for the host loop: the λ coin, completions, and teacher futures.

A batch is produced for a given future step: the coin is drawn, prompts are
taken from the data iterator, completions come from the student (on-policy),
the teacher (seq_kd) or the dataset, and the teacher scoring request is sent
at once. The trainer waits on the returned future only when it trains on the
batch, so scoring overlaps with whatever runs in between (the current update,
under the off-policy schedulers).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
from absl import logging

from gold_jax import onpolicy
from gold_jax.distributed import StepCheck
from gold_jax.onpolicy import behaviour_logprobs, mix_rows
from gold_jax.types import SequenceBatch, TeacherScores

_SEQ_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
_SCORE_KEYS = ("logprobs", "ids", "topk_logmass", "token_logprob")


@dataclasses.dataclass
class PendingBatch:
    """A batch generated for `step`, possibly still waiting for its teacher scores."""
    step: int
    on_policy: bool
    seq: SequenceBatch
    gen_time: float
    future: Future | None = None
    scores: TeacherScores | None = None
    rows: np.ndarray | None = None       # H8: [B] bool, which rows the student sampled (None: all = on_policy)
    behaviour: np.ndarray | None = None  # H8: [B, R] float32 rollout log-probs of those rows' tokens (0 elsewhere)
    version: int = -1                    # H8: the step whose weights generated it (gold/staleness); -1 unknown
    all_rows: np.ndarray | None = None   # HOSTS: [global B] bool, every process's row coins (per-row λ)

    def global_row_flags(self) -> np.ndarray:
        """Row flags of the whole global batch (the same on every process); counts and metrics use these."""
        return np.asarray(self.all_rows, bool) if self.all_rows is not None else self.row_flags()

    def row_flags(self) -> np.ndarray:
        if self.rows is not None:
            return np.asarray(self.rows, bool)
        return np.full((self.seq.prompt_ids.shape[0],), bool(self.on_policy))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Checkpoint form (scores must be resolved): plain numpy arrays only."""
        if self.scores is None:
            raise RuntimeError(f"batch for step {self.step} has no teacher scores yet")
        out = {f"seq.{k}": getattr(self.seq, k) for k in _SEQ_KEYS}
        out.update({f"scores.{k}": getattr(self.scores, k) for k in _SCORE_KEYS if getattr(self.scores, k) is not None})
        for k, v in (getattr(self.scores, "cross", None) or {}).items():   # H10: cross-tokenizer fields
            out[f"scores.cross.{k}"] = np.asarray(v)
        if getattr(self.scores, "hidden", None) is not None:   # H7: bfloat16 as its raw bits
            out["scores.hidden_bits"] = np.ascontiguousarray(self.scores.hidden).view(np.uint16)
        out["meta"] = np.asarray([self.step, int(self.on_policy)], np.int64)
        out["gen_time"] = np.asarray(self.gen_time, np.float64)
        out["rows"] = self.row_flags().astype(np.int8)
        out["version"] = np.asarray(self.version, np.int64)
        if self.behaviour is not None:
            out["behaviour"] = np.asarray(self.behaviour, np.float32)
        if self.all_rows is not None:
            out["all_rows"] = np.asarray(self.all_rows, np.int8)
        return out

    @classmethod
    def from_arrays(cls, d: dict[str, np.ndarray]) -> PendingBatch:
        seq = SequenceBatch(*(np.asarray(d[f"seq.{k}"]) for k in _SEQ_KEYS))
        scores = TeacherScores(*(None if f"scores.{k}" not in d else np.asarray(d[f"scores.{k}"])
                                 for k in _SCORE_KEYS))
        cross = {k[len("scores.cross."):]: np.asarray(v) for k, v in d.items() if k.startswith("scores.cross.")}
        if cross:   # H10 (issue 15)
            scores.cross = cross
        if "scores.hidden_bits" in d:
            import ml_dtypes
            scores.hidden = np.asarray(d["scores.hidden_bits"], np.uint16).view(ml_dtypes.bfloat16)
        step, on_policy = (int(x) for x in np.asarray(d["meta"]))
        return cls(step, bool(on_policy), seq, float(np.asarray(d["gen_time"])), scores=scores,
                   rows=np.asarray(d["rows"]).astype(bool) if "rows" in d else None,
                   behaviour=np.asarray(d["behaviour"]) if "behaviour" in d else None,
                   version=int(np.asarray(d["version"])) if "version" in d else -1,
                   all_rows=np.asarray(d["all_rows"]).astype(bool) if "all_rows" in d else None)


def seq_from_data(data: dict[str, np.ndarray]) -> SequenceBatch:
    """A data-pipeline batch (dataset completions) as a SequenceBatch."""
    return SequenceBatch(*(np.asarray(data[k], np.int32) for k in _SEQ_KEYS))


def train_arrays(seq: SequenceBatch, scores: TeacherScores, rows: np.ndarray | None = None,
                 behaviour: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The train step's input dict (gold_jax.train_step.loss_sum) for one batch.

    rows [B] (H8): 1 where the student sampled the row; behaviour [B, R]: its rollout log-probs.
    """
    out = {"input_ids": seq.input_ids.astype(np.int32), "attention_mask": seq.attention_mask.astype(np.int32),
           "completion_mask": seq.completion_mask.astype(np.int32)}
    cross = getattr(scores, "cross", None)
    if cross is not None:   # H10 (issue 15): the teacher's top-k aligned to student positions (SIGNALS["cross"])
        out.update(cross_arrays(scores))
    # H7: a colocated teacher sends nothing (the step runs it); a hidden-state teacher sends hidden states.
    hidden = None if cross is not None else getattr(scores, "hidden", None)
    if hidden is not None:
        out["teacher_hidden"] = hidden
    elif scores.logprobs is not None and cross is None:
        out["teacher_logprobs"] = np.asarray(scores.logprobs, np.float32)
    if scores.ids is not None and cross is None:  # top-k rows; full rows (top_k = 0) have no ids
        out["teacher_ids"] = np.asarray(scores.ids, np.int32)
        out["teacher_logmass"] = np.asarray(scores.topk_logmass, np.float32)
    if scores.token_logprob is not None:   # H8: OPD and the diagnostics read the sampled token's log-prob
        out["teacher_token_logprob"] = np.asarray(scores.token_logprob, np.float32)
    if rows is not None:
        out["on_policy"] = np.asarray(rows, np.float32)
    if behaviour is not None:
        out["behaviour_logprob"] = np.asarray(behaviour, np.float32)
    r = seq.completion_ids.shape[1]
    for k in ("teacher_logprobs", "teacher_hidden"):
        if k in out and out[k].shape[:2] != (seq.completion_ids.shape[0], r):
            raise ValueError(f"teacher scores {k} have shape {out[k].shape}, expected "
                             f"[{seq.completion_ids.shape[0]}, {r}, ...] for the completion span")
    return out


def cross_arrays(scores: TeacherScores) -> dict[str, np.ndarray]:
    """The batch fields of the "cross" signal (gold_jax.crosstok.fields.FIELDS) from cross scores."""
    c = scores.cross
    return {"teacher_logprobs": np.asarray(scores.logprobs, np.float32),
            "teacher_student_ids": np.asarray(scores.ids, np.int32),
            "teacher_logmass": np.asarray(scores.topk_logmass, np.float32),
            "teacher_logscale": np.asarray(c["logscale"], np.float32), "span_id": np.asarray(c["span_id"], np.int32),
            "span_base": np.asarray(c["span_base"], np.int32), "loss_mask": np.asarray(c["loss_mask"], np.float32)}


def unaligned_counts(scores: TeacherScores | None) -> tuple[int, int] | None:
    """(unaligned, scored) student positions of a cross-tokenizer batch (gold/unaligned_frac); None otherwise."""
    c = getattr(scores, "cross", None)
    if c is None:
        return None
    return int(np.sum(c["unaligned"])), int(np.sum(c["scored"]))


def rollout_seed(seed: int, step: int) -> int:
    """Sampling seed of the batch for `step`: a function of (seed, step) only, so a resume regenerates nothing."""
    return int(np.random.SeedSequence([int(seed), 7919, int(step)]).generate_state(1)[0])


class _EndOfData:
    """What BatchProducer.produce returns once the data iterator is exhausted."""

    def __repr__(self) -> str:
        return "END_OF_DATA"


END_OF_DATA = _EndOfData()


class BatchProducer:
    """Draws the coin and makes the batch for a step; owns the host RNG and the data iterator.

    Every wait on the teacher (training batches and evaluation alike) goes through `_wait`,
    which re-sends after a lost teacher for up to `teacher.wait_s` seconds.
    """

    def __init__(self, cfg: Any, data_iter: Any, engine: Any, teacher: Any, rng: np.random.Generator):
        """`teacher`: a gold_jax.teacher.handle.TeacherHandle (score/generate)."""
        self.cfg, self.data_iter, self.engine, self.teacher, self.rng = cfg, data_iter, engine, teacher, rng
        self.check = StepCheck.from_config(cfg)   # HOSTS: the same decisions on every process, or a loud stop

    def produce(self, step: int) -> PendingBatch | _EndOfData:
        """The batch for `step` with its scoring request sent, or END_OF_DATA when the epochs are used up."""
        g = self.cfg.gold
        t0 = time.perf_counter()
        per_row = g.get("lmbda_granularity", "batch") == "sample"
        # The coin is drawn when generation starts, before the data is read (DESIGN.md); per-row coins
        # (H8, gold.lmbda_granularity="sample") once the data says how many rows there are.
        on_policy = None if per_row else onpolicy.coin(self.rng, g.lmbda)
        data = next(self.data_iter, None)
        rows = all_rows = None
        if per_row and data is not None:   # HOSTS: coins for the global batch, this process's slice
            rows, all_rows = onpolicy.draw_global_rows(self.rng, g.lmbda, len(data["prompt_ids"]))
            on_policy = bool(all_rows.any())   # the same on every process
        self.check(onpolicy.decision(step, on_policy, all_rows, data is None, self.rng))
        if data is None:
            return END_OF_DATA
        behaviour = None
        if per_row:
            seq = seq_from_data(data)
            if on_policy:
                gen, lp = self._sample(self._engine_generate, data, step, with_logprobs=True)
                seq = gen if rows.all() else mix_rows(rows, gen, seq)
                behaviour = behaviour_logprobs(rows, lp, seq.completion_ids.shape)
        elif on_policy:
            seq, lp = self._sample(self._engine_generate, data, step, with_logprobs=True)
            rows = np.ones((seq.prompt_ids.shape[0],), bool)
            behaviour = behaviour_logprobs(rows, lp, seq.completion_ids.shape)
        elif g.seq_kd:
            seq = self._sample(lambda *a, **kw: self.teacher.generate(*a, **kw).result(), data, step)
        else:
            seq = seq_from_data(data)
        gen_time = time.perf_counter() - t0
        # Dataset completions recur every epoch: only those may come from the score cache.
        return PendingBatch(step, on_policy, seq, gen_time, future=self.teacher.score(seq, cacheable=not on_policy),
                            rows=rows, behaviour=behaviour, all_rows=all_rows)

    def _engine_generate(self, prompt_ids: np.ndarray, *a: Any, **kw: Any) -> Any:
        """The student engine's generate, told where this process's rows sit in the global batch."""
        off = onpolicy.row_offset(len(prompt_ids))
        return self.engine.generate(prompt_ids, *a, **kw, **({"row_offset": off} if off else {}))

    def _sample(self, generate: Any, data: dict[str, np.ndarray], step: int, with_logprobs: bool = False) -> Any:
        r = self.cfg.rollout
        out = generate(data["prompt_ids"], data["prompt_mask"], max_new_tokens=int(self.cfg.data.max_response_length),
                       temperature=float(self.cfg.gold.temperature), top_p=float(r.top_p), top_k=int(r.top_k),
                       seed=rollout_seed(self.cfg.seed, step))
        c_ids, c_mask = out.completion_ids, out.completion_mask
        eos_ids = getattr(self.engine, "eos_ids", None)
        if eos_ids:   # H4: the student's EOS set ends every completion (a teacher may stop on other ids)
            from gold_jax.rollout.base import end_at_eos
            c_ids, c_mask = end_at_eos(c_ids, c_mask, eos_ids, int(getattr(self.engine, "pad_id", 0) or 0))
        seq = SequenceBatch(out.prompt_ids, out.prompt_mask, c_ids, c_mask)
        # H8: the engine's log-probs of the sampled tokens (behaviour policy), for the importance ratio.
        return (seq, getattr(out, "logprobs", None)) if with_logprobs else seq

    def resolve(self, p: PendingBatch) -> float:
        """Wait for the batch's teacher scores (re-sending after a lost teacher); returns seconds waited."""
        t0 = time.perf_counter()
        if p.scores is None:
            p.scores = self._wait(p.future, lambda: self.teacher.score(p.seq, cacheable=not p.on_policy),
                                  f"scoring step {p.step}")
        p.future = None
        return time.perf_counter() - t0

    def score_now(self, seq: SequenceBatch, what: str) -> TeacherScores:
        """Scores of dataset rows (validation), with the same waiting and re-sending as training batches."""
        return self._wait(self.teacher.score(seq, cacheable=True), lambda: self.teacher.score(seq, cacheable=True),
                          what)

    def _wait(self, future: Future, resend: Callable[[], Future], what: str) -> TeacherScores:
        wait_s = float(self.cfg.teacher.wait_s)
        deadline = time.perf_counter() + wait_s
        while True:
            try:
                return future.result()
            except (TimeoutError, ConnectionError) as e:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"teacher unreachable for {wait_s:g}s (config.teacher.wait_s) while "
                                       f"{what}: {e}") from e
                logging.warning("teacher did not answer while %s (%s); re-sending", what, e)
                future = resend()

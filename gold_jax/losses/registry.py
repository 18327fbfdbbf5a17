"""The loss table: every training loss, what teacher signal it reads and what it needs.

One row per loss. A row names the function that turns one micro-batch into a
loss *sum* over completion tokens, the teacher signals it can consume (each
signal lists the batch fields the trainer must provide), and whether it needs
the device mesh. `gold_jax.config` validates `loss.impl` against this table and
`gold_jax.train_step.loss_sum` dispatches through it, so adding a loss is one
file (its numerics and a `loss_sum(model, hidden, batch, spec, mesh)` function)
plus one row in `LOSSES`.

This module imports nothing heavy (functions are named as "module:function" and
imported on first use): config validation must run in a second, before jax.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from gold_jax.names import TOPK_MODES


@dataclasses.dataclass(frozen=True)
class Signal:
    """What the teacher sends per completion token, as arrays of the training batch."""
    fields: tuple[str, ...]       # batch keys the trainer must fill (teacher_* arrays)
    doc: str


SIGNALS: dict[str, Signal] = {
    "topk": Signal(("teacher_logprobs", "teacher_ids", "teacher_logmass"),
                   "k log-probs at temperature T, their ids, the exact log-mass of the set"),
    "full": Signal(("teacher_logprobs",), "full rows of log-probs at temperature T (gold.top_k=0)"),
    # The step adds "teacher_head" [Ht, V] (and, colocated, computes teacher_hidden itself):
    # gold_jax.teacher.colocated.teacher_fields.
    "hidden": Signal(("teacher_hidden",), "the teacher's final normed hidden states (bfloat16 on the wire, or "
                     "computed in the step with teacher.mode='colocated'); teacher logits are built chunk by "
                     "chunk in the fused loss from the teacher's head: the exact dense JSD"),
    # H10 (issue 15), gold.cross_tokenizer: a teacher of another tokenizer scores the same text and answers per
    # *student* position (gold_jax.crosstok.request / fields.FIELDS): its top-k at each span's base position,
    # ids mapped to the student vocabulary (-1 none), the span's merge log-scale, span ids and the loss mask.
    "cross": Signal(("teacher_logprobs", "teacher_student_ids", "teacher_logmass", "teacher_logscale", "span_id",
                     "span_base", "loss_mask"),
                    "the teacher's top-k aligned to the student's tokens by text offsets (cross-tokenizer)"),
}


@dataclasses.dataclass(frozen=True)
class LossImpl:
    """One training loss. `fn`: "module:function" (imported on first use) or the function itself."""
    fn: str | Callable[..., Any]
    signals: tuple[str, ...]          # teacher signals it consumes (keys of SIGNALS)
    needs_mesh: bool = False          # shard_map over the mesh's tensor axis: train_step passes the mesh
    extra_fields: tuple[str, ...] = ()  # batch keys beyond the signal's (e.g. sampled-token log-probs)
    doc: str = ""

    def fields(self, signal: str) -> tuple[str, ...]:
        """Batch keys this loss reads under `signal` (besides the token ids and masks)."""
        return SIGNALS[signal].fields + self.extra_fields

    def load(self) -> Callable[..., Any]:
        if callable(self.fn):
            return self.fn
        module, name = self.fn.split(":")
        return getattr(importlib.import_module(module), name)


# LossFn(model, hidden [B, R, H] at the positions predicting the completion tokens,
#        batch (completion_mask [B, R] and the signal's fields), spec: LossSpec, mesh | None) -> scalar sum.
_ADAPTERS = "gold_jax.losses.adapters"
LOSSES: dict[str, LossImpl] = {
    "topk": LossImpl(f"{_ADAPTERS}:topk_loss_sum", ("topk",),
                     doc="top-k JSD (tail bucket or renormalised) on materialised logits"),
    "fused": LossImpl(f"{_ADAPTERS}:fused_loss_sum", ("topk", "full", "hidden"),
                      doc="chunked lm-head + JSD: logits never exist for all tokens at once"),
    "vocab_parallel": LossImpl(f"{_ADAPTERS}:vocab_parallel_loss_sum", ("topk", "full"), needs_mesh=True,
                               doc="logits' vocab axis sharded over the tensor axis (shard_map, psum/pmax)"),
    "dense": LossImpl(f"{_ADAPTERS}:dense_loss_sum", ("full",), doc="JSD on full teacher rows"),
    # H10 (issue 15): TRL GOLD's ULD (sorted L1, top-k + tail) or, gold.uld_use_hybrid_loss, its hybrid
    # (JSD on the shared vocabulary + ULD on the rest), plus uld_crossentropy_weight x the student's NLL.
    "uld": LossImpl(f"{_ADAPTERS}:uld_loss_sum", ("cross",),
                    doc="cross-tokenizer ULD / hybrid on the teacher's aligned top-k (gold.cross_tokenizer)"),
}


def loss_impls() -> tuple[str, ...]:
    """The values `loss.impl` accepts: "auto" and every row of the table."""
    return ("auto",) + tuple(LOSSES)


LOSS_IMPLS = loss_impls()


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Static loss settings of a run (hashable: part of the jit'd step's closure)."""
    impl: str = "topk"           # a key of LOSSES (never "auto": see resolve_impl)
    beta: float = 0.5
    temperature: float = 0.9
    mode: str = "tail"           # top-k: tail bucket or renormalize
    chunk_size: int = 256
    dtype: str = "float32"       # compute dtype of the student forward
    vocab_size: int | None = None  # tokenizer size: logit columns at or past it are embedding padding
    # H8 (issue 14), read by gold_jax.losses.objective: gold.loss and its knobs, and the diagnostics.
    loss: str = "jsd"              # jsd | opd
    opd_coef: float = 1.0
    opd_offpolicy_weight: float = 1.0
    importance_correction: bool = False
    importance_cap: float | None = 2.0
    diagnostics: bool = False      # top-k coverage metrics (teacher/topk_mass, ...) from the loss's own logits
    always_on_policy: bool = False  # lmbda == 1: no off-policy rows, so an opd run never needs the JSD
    per_row: bool = False          # gold.lmbda_granularity == "sample": rows of one batch differ
    # H10 (issue 15), read by adapters.uld_loss_sum: TRL GOLD's uld_* settings (weights resolved at start-up:
    # adaptive hybrid weights need the run's VocabMap) and the student's shared-vocabulary mask.
    uld_hybrid: bool = False            # gold.uld_use_hybrid_loss
    uld_matched_weight: float = 1.0
    uld_unmatched_weight: float = 1.0
    uld_crossentropy_weight: float = 0.0
    uld_distillation_weight: float = 1.0
    uld_student_temperature: float = 1.0
    student_shared: bytes | None = None   # np.packbits of VocabMap.student_shared [student logit width]


def teacher_signal(top_k: int, signal: str = "topk", mode: str = "server", cross: bool = False) -> str:
    """The signal a config trains on: aligned top-k for a teacher of another tokenizer (`cross`: the run's
    start-up check found one and gold.cross_tokenizer allows it), hidden states for a colocated teacher or
    gold.teacher_signal="hidden", full rows for gold.teacher_signal="full" or gold.top_k == 0, else top-k."""
    if cross:
        return "cross"
    if mode == "colocated" or signal == "hidden":
        return "hidden"
    return "full" if signal == "full" or int(top_k) == 0 else "topk"


def resolve_impl(impl: str, signal: str, tensor: int) -> str:
    """loss.impl with "auto" replaced: dense for full rows, vocab_parallel when the vocab is split, else topk."""
    if impl != "auto":
        return impl
    if signal == "cross":
        return "uld"     # the only loss that reads aligned cross-tokenizer fields
    if signal == "hidden":
        return "fused"   # the only loss that builds teacher logits from hidden states
    if signal == "full":
        return "dense"
    return "vocab_parallel" if tensor > 1 else "topk"


def check(impl: str, signal: str, mode: str) -> str | None:
    """Why `impl` cannot train on `signal` (None if it can); the caller names the config keys."""
    if impl not in loss_impls():
        return f"unknown loss; known: {loss_impls()}"
    if signal not in SIGNALS:
        return f"unknown teacher signal {signal!r}; known: {tuple(SIGNALS)}"
    if mode not in TOPK_MODES:
        return f"unknown top-k mode {mode!r}; known: {TOPK_MODES}"
    if impl != "auto" and signal not in LOSSES[impl].signals:
        wants = " or ".join(repr(s) for s in LOSSES[impl].signals)
        return f"this loss needs the teacher signal {wants}, and the config gives {signal!r}"
    return None


def get(impl: str) -> LossImpl:
    try:
        return LOSSES[impl]
    except KeyError:
        raise ValueError(f"loss impl {impl!r} is not in the loss table; known: {tuple(LOSSES)}") from None

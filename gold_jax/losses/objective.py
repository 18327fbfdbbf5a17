"""The training objective of one micro-batch when rows differ: JSD or OPD per row, importance weights, metrics.

`gold.loss="jsd"` trains every row on the generalized JSD; `gold.loss="opd"`
trains on-policy rows (student samples) on the OPD surrogate (losses/opd.py)
and off-policy rows (dataset or teacher completions) on the JSD weighted by
`gold.opd_offpolicy_weight`. With `gold.importance_correction` every token of
a student-generated row is weighted by min(q_θ(y_t) / μ(y_t), cap), μ the
rollout engine's log-probs recorded at generation time (token-level TIS, as
verl applies it to every token's loss; for the JSD, whose token loss is an
expectation given the prefix, this is the same token-level approximation).

Batch fields beyond the teacher signal's: `on_policy` [B] (1 = the row was
sampled by the student), `teacher_token_logprob` [B, R] (OPD and the
diagnostics), `behaviour_logprob` [B, R] (importance correction).

Returns (loss sum, aux): aux holds (sum, count) pairs that add over
micro-batches (train_step divides once): per-group training loss, the
top-k diagnostics (losses/diagnostics.py) for on- and off-policy rows, and the
importance ratio's sum / max / count.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from gold_jax.losses import diagnostics as diag
from gold_jax.losses.opd import _logprob_parts, chunked_sampled_logprob, importance_weights, opd_token_terms

GROUPS = ("on_policy", "off_policy")


def _opt(spec: Any, name: str, default: Any) -> Any:
    return getattr(spec, name, default)


def per_token_jsd(model: Any, hidden: jax.Array, batch: dict[str, jax.Array], spec: Any, mesh: Any) -> jax.Array:
    """Unreduced per-token JSD [B, R] with the run's loss implementation (spec.impl)."""
    from gold_jax.losses.dense import generalized_jsd
    from gold_jax.losses.fused import fused_jsd
    from gold_jax.losses.topk import topk_jsd
    from gold_jax.losses.vocab_parallel import vocab_parallel_jsd, vocab_parallel_topk_jsd
    mask = batch["completion_mask"].astype(jnp.float32)
    kw = dict(beta=spec.beta, temperature=spec.temperature, reduction="none", vocab_size=spec.vocab_size)
    full = "teacher_ids" not in batch
    t_lp = batch["teacher_logprobs"]
    if full and t_lp.shape[-1] < model.config.vocab_size:
        # Full rows cover the tokenizer's ids; the student's padded embedding rows get -inf.
        width = model.config.vocab_size - t_lp.shape[-1]
        t_lp = jnp.pad(t_lp, [(0, 0)] * (t_lp.ndim - 1) + [(0, width)], constant_values=-jnp.inf)
    lm = batch.get("teacher_logmass")
    if spec.impl == "fused":
        w = model.lm_head_weight().astype(hidden.dtype)
        if full:
            return fused_jsd(hidden, w, None, None, mask, mode="dense", teacher_logits=t_lp * spec.temperature,
                             chunk_size=spec.chunk_size, **kw)
        return fused_jsd(hidden, w, t_lp, batch["teacher_ids"], mask, mode=spec.mode, chunk_size=spec.chunk_size,
                         teacher_logmass=lm, **kw)
    logits = model.logits_from_hidden(hidden)
    if spec.impl == "vocab_parallel":
        from gold_jax.sharding.rules import BATCH_AXES, mesh_axes
        par = dict(mesh=mesh, batch_axes=BATCH_AXES, axis=mesh_axes("act_vocab")[0], **kw)
        if full:
            return vocab_parallel_jsd(logits, t_lp * spec.temperature, mask, **par)
        return vocab_parallel_topk_jsd(logits, t_lp, batch["teacher_ids"], mask, mode=spec.mode,
                                       teacher_logmass=lm, **par)
    if full:
        return generalized_jsd(logits, t_lp * spec.temperature, mask, **kw)
    return topk_jsd(logits, t_lp, batch["teacher_ids"], mask, mode=spec.mode, teacher_logmass=lm, **kw)


def _student_logprob_and_stats(model, hidden, batch, spec, want_stats: bool):
    """(log q_θ(y_t) [B, R], student diagnostics [B, R, 2] or None) in one pass over the logits.

    Materialised implementations share the logits (and, under jit, their
    normaliser) with the JSD; "fused" walks the lm head chunk by chunk.
    """
    r = batch["completion_mask"].shape[1]
    ids = batch["input_ids"][:, -r:]
    t_ids = batch["teacher_ids"] if want_stats else None
    if spec.impl == "fused":
        b, _, h = hidden.shape
        lq, st = chunked_sampled_logprob(hidden.reshape(b * r, h), model.lm_head_weight().astype(hidden.dtype),
                                         ids.reshape(b * r), temperature=spec.temperature,
                                         vocab_size=spec.vocab_size, chunk_size=spec.chunk_size,
                                         teacher_ids=None if t_ids is None else t_ids.reshape(b * r, -1))
        return lq.reshape(b, r), None if st is None else st.reshape(b, r, 2)
    s, m, log_sum, lq = _logprob_parts(model.logits_from_hidden(hidden), ids, spec.temperature, spec.vocab_size)
    if not want_stats:
        return lq, None
    vocab = s.shape[-1] if spec.vocab_size is None else spec.vocab_size
    return lq, diag.student_stats(s, m, log_sum, t_ids, vocab)


def _sum_count(x: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = lax.stop_gradient(x)
    return jnp.sum(jnp.where(keep, x, 0.0)), jnp.sum(keep, dtype=jnp.float32)


def objective_sum(model: Any, hidden: jax.Array, batch: dict[str, jax.Array], spec: Any,
                  mesh: Any) -> tuple[jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
    """(loss sum over completion tokens, aux sums) of one micro-batch; see the module docstring."""
    mask = batch["completion_mask"].astype(bool)
    b = mask.shape[0]
    on_rows = batch["on_policy"].astype(bool) if "on_policy" in batch else jnp.zeros((b,), bool)
    on_tok = mask & on_rows[:, None]
    off_tok = mask & ~on_rows[:, None]
    loss_kind = _opt(spec, "loss", "jsd")
    cap = _opt(spec, "importance_cap", None)
    correct = "behaviour_logprob" in batch and _opt(spec, "importance_correction", False)
    want_diag = _opt(spec, "diagnostics", True) and "teacher_ids" in batch and "teacher_token_logprob" in batch
    need_lq = loss_kind == "opd" or correct or want_diag
    lq, stats = (_student_logprob_and_stats(model, hidden, batch, spec, want_diag) if need_lq else (None, None))

    weight = jnp.ones(mask.shape, jnp.float32)
    aux: dict[str, tuple[jax.Array, jax.Array]] = {}
    if correct:
        w, ratio = importance_weights(lq, batch["behaviour_logprob"], cap)
        weight = jnp.where(on_tok, w, 1.0)
        aux["importance_ratio"] = _sum_count(ratio, on_tok)
        aux["importance_ratio_max"] = (jnp.max(jnp.where(on_tok, lax.stop_gradient(ratio), 0.0)), jnp.float32(1.0))

    # OPD runs need the JSD only for off-policy rows that carry weight (none when every row is on-policy).
    jsd_needed = float(_opt(spec, "opd_offpolicy_weight", 1.0)) > 0 and not _opt(spec, "always_on_policy", False)
    per_token = jnp.zeros(mask.shape, jnp.float32)
    if loss_kind == "jsd":
        jt = per_token_jsd(model, hidden, batch, spec, mesh)
        per_token = weight * jt
        aux["loss/on_policy"] = _sum_count(jt, on_tok)
        aux["loss/off_policy"] = _sum_count(jt, off_tok)
    else:
        opd = opd_token_terms(lq, batch["teacher_token_logprob"], coef=float(_opt(spec, "opd_coef", 1.0)),
                              weight=weight)
        per_token = jnp.where(on_rows[:, None], opd, 0.0)
        aux["loss/on_policy"] = _sum_count(opd, on_tok)
        aux["opd/reverse_kl"] = _sum_count(lq - batch["teacher_token_logprob"].astype(lq.dtype), on_tok)
        if jsd_needed:
            jt = per_token_jsd(model, hidden, batch, spec, mesh)
            off_w = float(_opt(spec, "opd_offpolicy_weight", 1.0))
            per_token = per_token + jnp.where(on_rows[:, None], 0.0, off_w * weight * jt)
            aux["loss/off_policy"] = _sum_count(jt, off_tok)
    if want_diag:
        per_diag = diag.assemble(stats, diag.TopkTeacher(batch["teacher_logprobs"], batch["teacher_ids"],
                                                         batch.get("teacher_logmass")),
                                 batch["teacher_token_logprob"])
        for group, keep in zip(GROUPS, (on_tok, off_tok)):
            for name, v in per_diag.items():
                aux[f"{name}/{group}"] = _sum_count(v, keep)
    total = jnp.sum(jnp.where(mask, per_token, 0.0))
    return total, aux


def reduce_aux(aux: dict[str, tuple[jax.Array, jax.Array]]) -> dict[str, jax.Array]:
    """Summed aux pairs -> metric values (means; the ratio's max stays a max)."""
    out = {}
    for name, (s, c) in aux.items():
        out[name] = s if name.endswith("_max") else s / jnp.maximum(c, 1.0)
        if not name.endswith("_max"):
            out[f"{name}#count"] = c
    return out

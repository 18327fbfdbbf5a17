"""The table's loss functions: one micro-batch (student hidden states + teacher arrays) -> loss sum.

Each has the signature `(model, hidden, batch, spec, mesh) -> scalar`: `hidden`
[B, R, H] are the student's final hidden states at the positions that predict
the R completion tokens, `batch` holds `completion_mask` and the teacher
signal's arrays (gold_jax.losses.registry.SIGNALS), `spec` is the run's
LossSpec. They return the *sum* over completion tokens; train_step divides by
the token count of the whole step so gradient accumulation stays exact.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gold_jax.losses.dense import generalized_jsd
from gold_jax.losses.fused import fused_jsd
from gold_jax.losses.registry import LossSpec
from gold_jax.losses.topk import topk_jsd
from gold_jax.losses.vocab_parallel import vocab_parallel_jsd, vocab_parallel_topk_jsd
from gold_jax.sharding.rules import BATCH_AXES, mesh_axes


def _kw(spec: LossSpec) -> dict[str, Any]:
    return dict(beta=spec.beta, temperature=spec.temperature, reduction="sum", vocab_size=spec.vocab_size)


def _mask(batch: dict[str, jax.Array]) -> jax.Array:
    return batch["completion_mask"].astype(jnp.float32)


def full_rows(batch: dict[str, jax.Array], width: int) -> jax.Array:
    """Full teacher log-prob rows widened to the student's logit width.

    They cover the tokenizer's ids; the student's padded embedding rows get -inf.
    """
    t_lp = batch["teacher_logprobs"]
    if t_lp.shape[-1] < width:
        t_lp = jnp.pad(t_lp, [(0, 0)] * (t_lp.ndim - 1) + [(0, width - t_lp.shape[-1])], constant_values=-jnp.inf)
    return t_lp


def is_full(batch: dict[str, jax.Array]) -> bool:
    return "teacher_ids" not in batch


def topk_loss_sum(model: Any, hidden: jax.Array, batch: dict[str, jax.Array], spec: LossSpec,
                  mesh: Mesh | None) -> jax.Array:
    return topk_jsd(model.logits_from_hidden(hidden), batch["teacher_logprobs"], batch["teacher_ids"], _mask(batch),
                    mode=spec.mode, teacher_logmass=batch.get("teacher_logmass"), **_kw(spec))


def dense_loss_sum(model: Any, hidden: jax.Array, batch: dict[str, jax.Array], spec: LossSpec,
                   mesh: Mesh | None) -> jax.Array:
    # Full teacher rows arrive as log-probs at temperature T: pass them as logits at T=1 scale.
    t_lp = full_rows(batch, model.config.vocab_size)
    return generalized_jsd(model.logits_from_hidden(hidden), t_lp * spec.temperature, _mask(batch), **_kw(spec))


def vocab_parallel_loss_sum(model: Any, hidden: jax.Array, batch: dict[str, jax.Array], spec: LossSpec,
                            mesh: Mesh | None) -> jax.Array:
    if mesh is None:
        raise ValueError("loss impl 'vocab_parallel' needs the device mesh (its tensor axis splits the vocab)")
    logits = model.logits_from_hidden(hidden)
    par = dict(mesh=mesh, batch_axes=BATCH_AXES, axis=mesh_axes("act_vocab")[0], **_kw(spec))
    if is_full(batch):
        t_lp = full_rows(batch, model.config.vocab_size)
        return vocab_parallel_jsd(logits, t_lp * spec.temperature, _mask(batch), **par)
    return vocab_parallel_topk_jsd(logits, batch["teacher_logprobs"], batch["teacher_ids"], _mask(batch),
                                   mode=spec.mode, teacher_logmass=batch.get("teacher_logmass"), **par)


def fused_loss_sum(model: Any, hidden: jax.Array, batch: dict[str, jax.Array], spec: LossSpec,
                   mesh: Mesh | None) -> jax.Array:
    w = model.lm_head_weight().astype(hidden.dtype)
    if "teacher_hidden" in batch:   # hidden signal: teacher logits built chunk by chunk from its head
        return fused_jsd(hidden, w, None, None, _mask(batch), mode="hidden", teacher_hidden=batch["teacher_hidden"],
                         teacher_head=batch["teacher_head"], chunk_size=spec.chunk_size, **_kw(spec))
    if is_full(batch):
        t_lp = full_rows(batch, model.config.vocab_size)
        return fused_jsd(hidden, w, None, None, _mask(batch), mode="dense", teacher_logits=t_lp * spec.temperature,
                         chunk_size=spec.chunk_size, **_kw(spec))
    return fused_jsd(hidden, w, batch["teacher_logprobs"], batch["teacher_ids"], _mask(batch), mode=spec.mode,
                     chunk_size=spec.chunk_size, teacher_logmass=batch.get("teacher_logmass"), **_kw(spec))


def student_shared_mask(spec: LossSpec, width: int) -> jax.Array:
    """bool [width]: the student tokens with a teacher twin (LossSpec.student_shared, packed once per run)."""
    if spec.student_shared is None:
        return jnp.zeros((width,), bool)
    bits = np.unpackbits(np.frombuffer(spec.student_shared, np.uint8), count=width)
    return jnp.asarray(bits.astype(bool))


def uld_loss_sum(model: Any, hidden: jax.Array, batch: dict[str, jax.Array], spec: LossSpec,
                 mesh: Mesh | None) -> jax.Array:
    """H10 (issue 15): uld_distillation_weight x (ULD or hybrid, at span bases) + uld_crossentropy_weight x
    the student's NLL of its completion tokens (TRL GOLD's ULD loss), summed over the micro-batch."""
    from gold_jax.crosstok.fields import FIELDS
    from gold_jax.losses.uld import cross_per_token
    logits = model.logits_from_hidden(hidden)
    r = batch["completion_mask"].shape[1]
    ids = batch["input_ids"][:, -r:]
    fields = {k: batch[k] for k in FIELDS}
    per = cross_per_token(logits, ids, fields, student_shared_mask(spec, logits.shape[-1]),
                          temperature=spec.uld_student_temperature, beta=spec.beta,
                          matched_weight=spec.uld_matched_weight, unmatched_weight=spec.uld_unmatched_weight,
                          hybrid=spec.uld_hybrid, vocab_size=spec.vocab_size)
    total = spec.uld_distillation_weight * jnp.sum(per)
    if spec.uld_crossentropy_weight:
        z = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        if spec.vocab_size is not None and spec.vocab_size < z.shape[-1]:
            z = jnp.where(jnp.arange(z.shape[-1]) < spec.vocab_size, z, -1e30)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
        total = total + spec.uld_crossentropy_weight * jnp.sum(nll * _mask(batch))
    return total

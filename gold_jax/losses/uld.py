"""Cross-tokenizer losses: ULD and TRL GOLD's hybrid (generalized JSD on shared tokens + ULD on the rest).

ULD (Universal Logit Distillation) compares the *sorted* probability vectors of
student and teacher: the L1 distance sum_i |s_(i) - t_(i)|, which needs no
token correspondence. With a top-k teacher nothing of size V crosses the wire:
the teacher's k largest probabilities are compared with the student's k largest
(`lax.top_k`, no full sort) and the rest of each distribution is one tail
bucket, |t_tail - s_tail|. With k = V this is the full ULD.

Hybrid (TRL `uld_use_hybrid_loss`): teacher tokens with a student twin of the
same string (see `gold_jax.crosstok.vocab_map`) get the generalized JSD
(beta, P = teacher); the others the sorted comparison. Weights are fixed
(`uld_hybrid_matched_weight` / `uld_hybrid_unmatched_weight`) or adaptive
(shared / teacher vocab size, as TRL). In top-k form the JSD runs over the
matched top-k ids plus one rest bucket (teacher: tail + unmatched top-k mass;
student: everything outside the matched ids), so with one tokenizer on both
sides it is exactly the top-k tail JSD (`gold_jax.losses.topk`). The unmatched
ULD compares the teacher's unmatched top-k probabilities (n_u of them, sorted)
with the student's n_u largest probabilities over its non-shared tokens; the
tail mass is already counted in the JSD's rest bucket.

Spans: where one side needs several tokens for the other side's one, the
merged distribution (`gold_jax.crosstok.align.span_arrays`, TRL's "observed" /
"bayesian" rule) is the base row times the product of the actual tokens'
probabilities. Here that product enters as a log-scale per position
(`student_logscale` from `span_logscale`, `teacher_logscale` from the server):
scaled rows are unnormalised, exactly as in TRL.

All functions are pure and jit-able and return per-token values [...] (the
caller masks and sums them, as the other losses' `*_per_token`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gold_jax.losses.core import NEG_FLOOR, jsd_terms, masked_normalizer, teacher_tail_logprob
from gold_jax.losses.topk import topk_mask

# TRL clamps each merged conditional probability at 1e-8 before multiplying.
MERGE_MIN_LOGPROB = math.log(1e-8)


def _scale(logscale, like):
    return jnp.zeros(like.shape[:-1], like.dtype) if logscale is None else logscale.astype(like.dtype)


def uld_topk_terms(logq: jax.Array, teacher_logprobs: jax.Array, teacher_logmass: jax.Array | None = None, *,
                   student_logscale: jax.Array | None = None,
                   teacher_logscale: jax.Array | None = None) -> jax.Array:
    """Per-token ULD: sorted L1 over the top-k of each side plus one tail bucket.

    logq [..., V]: student log-probs (normalised over its vocabulary);
    teacher_logprobs [..., k] in any order; teacher_logmass [...]: exact log-mass
    of the top-k set (default: from the log-probs).
    """
    k = teacher_logprobs.shape[-1]
    sls, tls = _scale(student_logscale, logq), _scale(teacher_logscale, logq)
    lt = jnp.maximum(teacher_logprobs.astype(logq.dtype), NEG_FLOOR)
    t_sorted = -jnp.sort(-jnp.exp(lt + tls[..., None]), axis=-1)
    lm = None if teacher_logmass is None else teacher_logmass.astype(logq.dtype)
    t_tail = jnp.exp(teacher_tail_logprob(lt, lm) + tls)
    s_top, _ = jax.lax.top_k(logq, k)
    s_sorted = jnp.exp(s_top + sls[..., None])
    # Student tail = everything outside its own top-k, as a masked logsumexp (1 - sum would cancel).
    s_tail = jnp.exp(_log_rest(logq, s_top) + sls)
    return jnp.sum(jnp.abs(t_sorted - s_sorted), axis=-1) + jnp.abs(t_tail - s_tail)


def _log_rest(logq: jax.Array, top_vals: jax.Array) -> jax.Array:
    """log of the student mass outside its k largest entries (ties: by position, as top_k)."""
    _, idx = jax.lax.top_k(logq, top_vals.shape[-1])
    rest = ~topk_mask(idx, logq.shape[-1])
    m, log_sum, has = masked_normalizer(logq, rest)
    return jnp.where(has, m + log_sum, NEG_FLOOR)


def hybrid_topk_terms(logq: jax.Array, teacher_logprobs: jax.Array, teacher_student_ids: jax.Array,
                      student_shared: jax.Array, teacher_logmass: jax.Array | None = None, *, beta: float,
                      matched_weight: float, unmatched_weight: float,
                      student_logscale: jax.Array | None = None,
                      teacher_logscale: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token (total, matched JSD, unmatched ULD) against a top-k teacher.

    teacher_student_ids [..., k]: the student id of each teacher top-k token
    (VocabMap.map_ids), -1 where unmatched. student_shared [V]: the student
    token has a teacher twin.
    """
    dt = logq.dtype
    sls, tls = _scale(student_logscale, logq), _scale(teacher_logscale, logq)
    lt = jnp.maximum(teacher_logprobs.astype(dt), NEG_FLOOR)
    lm = None if teacher_logmass is None else teacher_logmass.astype(dt)
    matched = teacher_student_ids >= 0
    ids = jnp.clip(teacher_student_ids, 0, logq.shape[-1] - 1).astype(jnp.int32)

    # Matched: JSD over the matched ids + one rest bucket, both sides scaled by their span products.
    lt_s = lt + tls[..., None]
    logq_m = jnp.take_along_axis(logq, ids, axis=-1) + sls[..., None]
    head = jnp.sum(jsd_terms(lt_s, jnp.where(matched, logq_m, 0.0), beta, valid=matched), axis=-1)
    t_unm = jax.nn.logsumexp(jnp.where(matched, NEG_FLOOR, lt), axis=-1)
    logp_rest = jnp.logaddexp(teacher_tail_logprob(lt, lm), t_unm) + tls
    rest_mask = ~topk_mask(jnp.where(matched, ids, logq.shape[-1]), logq.shape[-1])
    m, log_sum, has_rest = masked_normalizer(logq, rest_mask)
    logq_rest = jnp.where(has_rest, m + log_sum, 0.0) + sls
    rest = jsd_terms(logp_rest, logq_rest, beta, valid=has_rest)
    jsd = head + rest

    # Unmatched: the teacher's n_u unmatched top-k probabilities vs the student's n_u largest non-shared ones.
    k = lt.shape[-1]
    t_u = -jnp.sort(-jnp.where(matched, 0.0, jnp.exp(lt_s)), axis=-1)
    s_top, _ = jax.lax.top_k(jnp.where(student_shared, NEG_FLOOR, logq), k)
    s_u = jnp.exp(s_top + sls[..., None])
    n_u = jnp.sum(~matched, axis=-1)
    slot = jnp.arange(k) < n_u[..., None]
    uld = jnp.sum(jnp.where(slot, jnp.abs(t_u - s_u), 0.0), axis=-1)
    return matched_weight * jsd + unmatched_weight * uld, jsd, uld


def hybrid_full_terms(logq: jax.Array, logp: jax.Array, teacher_to_student: jax.Array, student_shared: jax.Array,
                      *, beta: float, matched_weight: float, unmatched_weight: float) -> tuple[jax.Array, ...]:
    """Per-token (total, matched JSD, unmatched ULD) on full rows, TRL's `_compute_hybrid_uld_loss`.

    logp [..., V_t] teacher log-probs; teacher_to_student [V_t] (-1 unmatched).
    The unmatched part is the L1 of both sides' unmatched probabilities, sorted
    and zero-padded to a common length. (TRL clamps probabilities at 1e-8
    before the log; exact logs here.)
    """
    matched = teacher_to_student >= 0
    ids = jnp.clip(teacher_to_student, 0, logq.shape[-1] - 1)
    logq_m = jnp.take(logq, ids, axis=-1)
    jsd = jnp.sum(jsd_terms(logp, jnp.where(matched, logq_m, 0.0), beta, valid=matched), axis=-1)
    t_u = -jnp.sort(-jnp.where(matched, 0.0, jnp.exp(logp)), axis=-1)
    s_u = -jnp.sort(-jnp.where(student_shared, 0.0, jnp.exp(logq)), axis=-1)
    n = max(t_u.shape[-1], s_u.shape[-1])
    pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])  # noqa: E731
    uld = jnp.sum(jnp.abs(pad(t_u) - pad(s_u)), axis=-1)
    return matched_weight * jsd + unmatched_weight * uld, jsd, uld


def span_logscale(logq_actual: jax.Array, span_id: jax.Array, base: jax.Array) -> jax.Array:
    """Per position [B, R]: at a span's base, the sum of the clamped log-probs of the span's other actual tokens.

    logq_actual [B, R]: the student's log-prob of the token at each position;
    span_id [B, R]: span index within the row (-1: no span); base [B, R]: the
    position carrying the span's loss. 0 elsewhere (and for one-token spans).
    """
    b, r = logq_actual.shape
    contrib = jnp.where((span_id >= 0) & ~base, jnp.maximum(logq_actual, MERGE_MIN_LOGPROB), 0.0)
    seg = jnp.where(span_id >= 0, span_id + jnp.arange(b)[:, None] * r, b * r)  # b*r: dropped
    sums = jax.ops.segment_sum(contrib.reshape(-1), seg.reshape(-1), num_segments=b * r + 1)
    return jnp.where(base, sums[jnp.where(span_id >= 0, seg, b * r)], 0.0)


def hybrid_weights(n_matched: int, teacher_vocab_size: int, matched_weight: float | None,
                   unmatched_weight: float | None) -> tuple[float, float]:
    """TRL's rule: both None -> adaptive (shared / teacher vocab, 1 - that); both set -> fixed; else an error."""
    if (matched_weight is None) != (unmatched_weight is None):
        raise ValueError("gold.uld_hybrid_matched_weight and gold.uld_hybrid_unmatched_weight must both be set "
                         "or both be None (adaptive)")
    if matched_weight is None:
        w = n_matched / max(1, teacher_vocab_size)
        return w, 1.0 - w
    if matched_weight < 0 or unmatched_weight < 0:
        raise ValueError("gold.uld_hybrid_*_weight must be >= 0")
    return float(matched_weight), float(unmatched_weight)


def cross_per_token(student_logits: jax.Array, completion_ids: jax.Array, fields: dict, student_shared: jax.Array,
                    *, temperature: float, beta: float, matched_weight: float, unmatched_weight: float,
                    hybrid: bool = True, vocab_size: int | None = None) -> jax.Array:
    """Per-token cross-tokenizer loss [B, R] from student logits and `gold_jax.crosstok.fields` arrays.

    The student side of each span is merged like the teacher's (span_logscale
    over the student's own log-probs of its actual tokens, differentiable);
    only span_base positions carry a value (times loss_mask).
    """
    s = jnp.maximum(student_logits.astype(jnp.promote_types(student_logits.dtype, jnp.float32)), NEG_FLOOR)
    s = s / temperature
    if vocab_size is not None and vocab_size < s.shape[-1]:
        s = jnp.where(jnp.arange(s.shape[-1]) < vocab_size, s, NEG_FLOOR)  # embedding padding columns
    logq = jax.nn.log_softmax(s, axis=-1)
    logq_actual = jnp.take_along_axis(logq, completion_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
    base = fields["span_base"].astype(bool)
    sls = span_logscale(logq_actual, fields["span_id"], base)
    tls = fields["teacher_logscale"]
    if hybrid:
        per = hybrid_topk_terms(logq, fields["teacher_logprobs"], fields["teacher_student_ids"], student_shared,
                                fields["teacher_logmass"], beta=beta, matched_weight=matched_weight,
                                unmatched_weight=unmatched_weight, student_logscale=sls, teacher_logscale=tls)[0]
    else:
        per = uld_topk_terms(logq, fields["teacher_logprobs"], fields["teacher_logmass"], student_logscale=sls,
                             teacher_logscale=tls)
    return jnp.where(base, per, 0.0) * fields["loss_mask"]

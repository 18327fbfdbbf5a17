"""On-policy distillation (OPD): the sampled-token reverse KL used as a per-token advantage.

The student q_θ samples a completion y; the teacher p scores it. Per token the
reward is

    r_t = opd_coef * (log p(y_t | y_<t) - log q_θ(y_t | y_<t))  [+ outcome reward]

and the loss is the policy-gradient surrogate with A_t = stop_gradient(r_t):

    L = - Σ_t w_t · A_t · log q_θ(y_t),   w_t = stop_gradient(min(q_θ(y_t) / μ(y_t), c)) or 1,

where μ is the rollout engine's (behaviour) policy. Its expected gradient over
y ~ q_θ is exactly ∇ KL(q_θ || p) per position: E_q[(log q - log p) ∇log q] =
Σ_y ∇q (log q - log p) (the Σ q ∇log q term is ∇Σq = 0). Under the off-policy
schedulers y ~ μ = q_{θ-s}; the truncated ratio (IMPALA's ρ̄, verl's TIS with
`tis_imp_ratio_cap`, 2.0 in verl's and the TIS blog's recipes) reweights the
sample towards q_θ, bias traded for bounded variance when the cap binds.

The value we return per token is -w_t · r_t (the weighted sampled reverse-KL
estimate when there is no outcome reward), not -w_t A_t log q: the two differ by
a term with zero gradient, and the former is a number worth logging.

References, and where we differ:
- tinker cookbook, `distillation/train_on_policy.py::incorporate_kl_penalty`:
  reverse_kl = sampled_logprobs - teacher_logprobs (the *sampler's* log-probs),
  advantages += -kl_penalty_coef * mask * reverse_kl (optionally a discounted
  future sum, kl_discount_factor, default 0), added to the env's (group-centred)
  outcome advantages; the loss is tinker's "importance_sampling":
  -(exp(logp_θ - logp_sampler) * advantages).sum(): a plain *sum* over tokens
  and sequences, with an untruncated ratio that carries the gradient.
- slime `--use-opd` (`apply_opd_kl_to_advantages` in the megatron loss):
  advantages -= opd_kl_coef * (old_student_logp - teacher_logp), then the usual
  PPO-clip policy loss; the default reduction is the mean over each sample's
  tokens averaged over samples, or the token mean with --calculate-per-token-loss.
- here: the reward uses the *current* student log-prob (stop-gradient; equal to
  the sampler's with no staleness and no train/rollout mismatch, and the
  unbiased choice for ∇KL(q_θ||p) when the sample is stale), the ratio is
  truncated and stop-gradient (TIS), there is no PPO clip (one update per
  batch), and the reduction is the repository's: sum over kept tokens divided
  by the number of kept tokens of the whole step (token mean, as slime's
  per-token mode and as our JSD), "sum" for gradient accumulation.
"""
from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from gold_jax.losses import diagnostics as diag
from gold_jax.losses import validation as val
from gold_jax.losses.core import NEG_FLOOR, compute_dtype, masked_normalizer, reduce_tokens, vocab_valid

# verl's TIS recipes and the TIS blog (Yao et al. 2025) truncate the token-level ratio at 2.
DEFAULT_IMPORTANCE_CAP = 2.0


def _logprob_parts(logits, token_ids, temperature, vocab_size):
    """(s, m, log_sum, log q(token_ids)): the scaled logits and their normaliser, shared with the diagnostics."""
    dt = compute_dtype(logits)
    s = jnp.maximum(logits.astype(dt), NEG_FLOOR) / temperature
    n_cols = s.shape[-1]
    vocab_size = n_cols if vocab_size is None else vocab_size
    valid = vocab_valid(n_cols, vocab_size)
    m, log_sum, _ = masked_normalizer(s, None if valid is None else jnp.broadcast_to(valid, s.shape))
    ids = jnp.clip(token_ids.astype(jnp.int32), 0, vocab_size - 1)
    s_y = jnp.take_along_axis(s, ids[..., None], axis=-1)[..., 0]
    return s, m, log_sum, (s_y - m) - log_sum


def sampled_logprob(logits: jax.Array, token_ids: jax.Array, *, temperature: float = 1.0,
                    vocab_size: int | None = None) -> jax.Array:
    """log softmax(logits / T)[token_ids]: [..., V], [...] -> [...]; columns >= vocab_size are padding."""
    return _logprob_parts(logits, token_ids, temperature, vocab_size)[3]


def importance_weights(student_logprob: jax.Array, behaviour_logprob: jax.Array,
                       cap: float | None = DEFAULT_IMPORTANCE_CAP) -> tuple[jax.Array, jax.Array]:
    """(weight, ratio): ratio = q_θ(y) / μ(y), weight = min(ratio, cap) (cap None: untruncated), both stop-gradient.

    The ratio is formed in log space and clamped before exp so that a token the
    sampler almost never picks cannot overflow (the cap binds long before).
    """
    log_ratio = lax.stop_gradient(student_logprob - behaviour_logprob.astype(student_logprob.dtype))
    ratio = jnp.exp(jnp.minimum(log_ratio, 80.0))
    weight = ratio if cap is None else jnp.minimum(ratio, cap)
    return weight, ratio


def opd_token_terms(student_logprob: jax.Array, teacher_logprob: jax.Array, *, coef: float = 1.0,
                    outcome_reward: jax.Array | None = None, weight: jax.Array | None = None) -> jax.Array:
    """Per-token OPD surrogate [...]: value -w·r, gradient -w·stop_gradient(r)·∇log q.

    student_logprob: log q_θ(y_t), differentiable; teacher_logprob: log p(y_t)
    (no gradient flows to it); outcome_reward broadcasts to the token shape
    (e.g. [B, 1] for one reward per sequence); weight: the importance weight.
    """
    lq = student_logprob
    lp = lax.stop_gradient(teacher_logprob.astype(lq.dtype))
    reward = coef * (lp - lax.stop_gradient(lq))
    if outcome_reward is not None:
        reward = reward + lax.stop_gradient(outcome_reward.astype(lq.dtype))
    w = 1.0 if weight is None else lax.stop_gradient(weight.astype(lq.dtype))
    # -w·A·(log q - sg(log q)) has the policy-gradient gradient and value 0; -w·r adds the value.
    return -w * reward * (lq - lax.stop_gradient(lq)) - w * reward


def _check_common(token_shape, completion_ids, teacher_logprob, mask, behaviour_logprob, outcome_reward,
                  coef, importance_cap) -> None:
    val.check_mask(completion_ids, token_shape, "completion_ids")
    val.check_mask(teacher_logprob, token_shape, "teacher_token_logprob")
    val.check_mask(mask, token_shape)
    if behaviour_logprob is not None:
        val.check_mask(behaviour_logprob, token_shape, "behaviour_logprob")
    if outcome_reward is not None:
        try:
            jnp.broadcast_shapes(tuple(outcome_reward.shape), tuple(token_shape))
        except ValueError:
            raise ValueError(f"outcome_reward has shape {tuple(outcome_reward.shape)}, which does not broadcast "
                             f"to the token shape {tuple(token_shape)}") from None
    if isinstance(coef, bool) or not isinstance(coef, numbers.Real) or not math.isfinite(coef):
        raise ValueError(f"coef (gold.opd_coef) must be a finite number, got {coef!r}")
    if importance_cap is not None and not (isinstance(importance_cap, numbers.Real) and importance_cap > 0):
        raise ValueError(f"importance_cap must be a number > 0 or None, got {importance_cap!r}")


def _per_token_from_logprob(lq, teacher_logprob, behaviour_logprob, outcome_reward, coef, importance_cap):
    weight = None
    if behaviour_logprob is not None:
        weight, _ = importance_weights(lq, behaviour_logprob, importance_cap)
    return opd_token_terms(lq, teacher_logprob, coef=coef, outcome_reward=outcome_reward, weight=weight)


def _check_teacher_topk(teacher: diag.TopkTeacher | None, logits_shape, mask, vocab_size: int) -> None:
    if teacher is not None:
        val.check_topk(logits_shape, teacher.logprobs, teacher.ids, mask, teacher.logmass, vocab_size)


def opd_loss(student_logits: jax.Array, completion_ids: jax.Array, teacher_token_logprob: jax.Array,
             mask: jax.Array, *, coef: float = 1.0, temperature: float = 1.0, reduction: str = "batchmean",
             behaviour_logprob: jax.Array | None = None, importance_cap: float | None = DEFAULT_IMPORTANCE_CAP,
             outcome_reward: jax.Array | None = None, vocab_size: int | None = None,
             diagnostics: diag.TopkTeacher | None = None):
    """OPD surrogate of student logits [..., V] at the sampled tokens completion_ids [...].

    teacher_token_logprob [...]: the teacher's log-prob of each sampled token at
    temperature T (TeacherScores.token_logprob). behaviour_logprob [...]: the
    rollout engine's log-probs of the same tokens; given, every token is weighted
    by min(q_θ/μ, importance_cap). Reductions as the JSD losses. With
    `diagnostics` (the teacher's top-k) the result is (loss, per-token
    diagnostics dict), computed from the same scaled logits and normaliser.
    """
    temperature = val.check_temperature(temperature)
    val.check_reduction(reduction)
    if student_logits.ndim < 1:
        raise ValueError("student_logits must have a vocabulary axis [..., V]")
    token_shape = student_logits.shape[:-1]
    _check_common(token_shape, completion_ids, teacher_token_logprob, mask, behaviour_logprob, outcome_reward,
                  coef, importance_cap)
    vocab_size = val.check_vocab_size(vocab_size, student_logits.shape[-1])
    _check_teacher_topk(diagnostics, student_logits.shape, mask, vocab_size)
    s, m, log_sum, lq = _logprob_parts(student_logits, completion_ids, temperature, vocab_size)
    per_token = _per_token_from_logprob(lq, teacher_token_logprob, behaviour_logprob, outcome_reward,
                                        float(coef), importance_cap)
    loss = reduce_tokens(per_token, mask, reduction, vocab_size)
    if diagnostics is None:
        return loss
    student = diag.student_stats(s, m, log_sum, diagnostics.ids, vocab_size)
    return loss, diag.assemble(student, diagnostics, teacher_token_logprob)


def _chunk_body(h_c, w, ids_c, t_ids_c, temperature, vocab_size, with_diag):
    logits = jnp.dot(h_c, w, preferred_element_type=compute_dtype(h_c, w))
    s, m, log_sum, lq = _logprob_parts(logits, ids_c, temperature, vocab_size)
    if not with_diag:
        return lq, None
    return lq, diag.student_stats(s, m, log_sum, t_ids_c, vocab_size)


def chunked_sampled_logprob(hidden: jax.Array, lm_head: jax.Array, token_ids: jax.Array, *,
                            temperature: float = 1.0, vocab_size: int | None = None, chunk_size: int = 512,
                            teacher_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """(log q(token_ids) [N], student diagnostics [N, 2] or None) for hidden [N, H] @ lm_head [H, V].

    One [chunk, V] block of logits at a time: each chunk is rematerialised in
    the backward pass (jax.checkpoint), so neither pass holds more; the lm-head
    gradient accumulates across chunks in the scan. With teacher_ids [N, k] the
    same chunk logits also give the student's mass on those ids and the top-k
    overlap (no gradient, no second pass).
    """
    n = hidden.shape[0]
    vocab_size = lm_head.shape[1] if vocab_size is None else vocab_size
    chunk = max(1, min(int(chunk_size), n))
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(n_chunks, chunk, hidden.shape[1])
    ids = jnp.pad(token_ids.astype(jnp.int32), (0, pad)).reshape(n_chunks, chunk)
    with_diag = teacher_ids is not None
    t_ids = (jnp.pad(teacher_ids.astype(jnp.int32), ((0, pad), (0, 0))).reshape(n_chunks, chunk, -1)
             if with_diag else jnp.zeros((n_chunks, chunk, 1), jnp.int32))
    body = jax.checkpoint(functools.partial(_chunk_body, temperature=temperature, vocab_size=vocab_size,
                                            with_diag=with_diag))

    def step(carry, xs):
        return carry, body(xs[0], lm_head, xs[1], xs[2])

    _, (lq, student) = lax.scan(step, None, (h, ids, t_ids))
    return lq.reshape(-1)[:n], None if student is None else student.reshape(-1, 2)[:n]


def fused_opd(hidden: jax.Array, lm_head: jax.Array, completion_ids: jax.Array, teacher_token_logprob: jax.Array,
              mask: jax.Array, *, coef: float = 1.0, temperature: float = 1.0, reduction: str = "batchmean",
              behaviour_logprob: jax.Array | None = None, importance_cap: float | None = DEFAULT_IMPORTANCE_CAP,
              outcome_reward: jax.Array | None = None, vocab_size: int | None = None,
              chunk_size: int = 512, diagnostics: diag.TopkTeacher | None = None):
    """`opd_loss` of softmax(hidden @ lm_head / T) without [N, V] logits: hidden [N, H] or [B, T, H]."""
    temperature = val.check_temperature(temperature)
    val.check_reduction(reduction)
    val.check_hidden_head(hidden, lm_head, chunk_size)
    lead = hidden.shape[:-1]
    _check_common(lead, completion_ids, teacher_token_logprob, mask, behaviour_logprob, outcome_reward,
                  coef, importance_cap)
    vocab_size = val.check_vocab_size(vocab_size, lm_head.shape[1])
    _check_teacher_topk(diagnostics, (*lead, lm_head.shape[1]), mask, vocab_size)
    n = math.prod(lead)
    t_ids = None if diagnostics is None else diagnostics.ids.reshape(n, -1)
    lq, student = chunked_sampled_logprob(hidden.reshape(n, hidden.shape[-1]), lm_head, completion_ids.reshape(n),
                                          temperature=temperature, vocab_size=vocab_size, chunk_size=chunk_size,
                                          teacher_ids=t_ids)
    per_token = _per_token_from_logprob(lq.reshape(lead), teacher_token_logprob, behaviour_logprob, outcome_reward,
                                        float(coef), importance_cap)
    loss = reduce_tokens(per_token, mask, reduction, vocab_size)
    if diagnostics is None:
        return loss
    return loss, diag.assemble(student.reshape(*lead, 2), diagnostics, teacher_token_logprob)

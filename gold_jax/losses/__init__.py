"""Generalized Jensen-Shannon divergence losses for GOLD distillation.

P = teacher, Q = student, M = beta P + (1-beta) Q; beta = 0 is KL(P||Q) and
beta = 1 is KL(Q||P). All variants share reductions: "batchmean" (sum over kept
tokens / kept tokens, 0 if none), "sum" (for gradient accumulation: divide by
the kept-token count of the whole accumulated batch), "mean" (sum / (kept x V),
as torch/TRL) and "none" (per-token, 0 where masked).
"""
from gold_jax.losses.core import loss_sum_and_count, reduce_tokens
from gold_jax.losses.dense import generalized_jsd
from gold_jax.losses.fused import fused_jsd
from gold_jax.losses.topk import topk_jsd
from gold_jax.losses.validation import REDUCTIONS, TOPK_MODES
from gold_jax.losses.vocab_parallel import vocab_parallel_jsd, vocab_parallel_topk_jsd

__all__ = [
    "generalized_jsd", "topk_jsd", "vocab_parallel_jsd", "vocab_parallel_topk_jsd", "fused_jsd",
    "loss_sum_and_count", "reduce_tokens", "REDUCTIONS", "TOPK_MODES",
]

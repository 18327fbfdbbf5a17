"""Allowed names for config values, each tuple owned by the module named beside it.

Dependency-free on purpose: `gold_jax.config.validate` checks a config against
these in about a second, before jax, flax, transformers or torch are imported.
The owning modules re-export their tuple from here, so each name list exists once.
"""
from __future__ import annotations

SCHEDULERS = ("sync", "one_step_off", "two_step_off")           # gold_jax.trainer
STALENESS = {"sync": 0, "one_step_off": 1, "two_step_off": 2}   # batches trained this many updates late
ROLLOUT_ENGINES = ("jax", "vllm")                               # gold_jax.rollout.make_engine
TEACHER_BACKENDS = ("jax", "vllm")                              # gold_jax.teacher.backends.make_backend
MODEL_DTYPES = ("float32", "bfloat16", "float16")               # gold_jax.models.config
LR_SCHEDULES = ("cosine", "linear", "constant")                 # gold_jax.train_step.make_schedule
TOPK_MODES = ("tail", "renormalize")                            # gold_jax.losses (top-k teacher)
TEACHER_MODES = ("server", "colocated")                         # gold_jax.components.connect_teacher
TEACHER_SIGNALS = ("topk", "full", "hidden")                    # gold_jax.losses.registry.SIGNALS
REDUCTIONS = ("batchmean", "sum", "mean", "none")               # gold_jax.losses
# The vllm teacher backend serves full rows (gold.top_k=0) and temperatures != 1 only up to this
# embedding size (gold_jax.teacher.backends.vllm_backend); config validation checks it early.
VLLM_FULL_ROWS_MAX_VOCAB = 4096

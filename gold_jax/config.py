"""The trainer's config schema (every field, with its default) and start-up validation.

configs/*.py start from `base_config()` and change recipe values; `validate()`
runs before any model, data or device work so a bad key or value fails in a
second with a message naming the key. This module and `validate` import
nothing heavy (no jax, flax, transformers or torch): the allowed names come
from the dependency-free `gold_jax.names` and the loss table.
"""
from __future__ import annotations

import math
import os
from typing import Any

import ml_collections

from gold_jax import config_checks
from gold_jax.data.config import default_data_config
from gold_jax.losses import registry
from gold_jax.losses.registry import LOSS_IMPLS  # noqa: F401 (re-exported)
from gold_jax.names import (LR_SCHEDULES, MODEL_DTYPES, ROLLOUT_ENGINES, SCHEDULERS, STALENESS,  # noqa: F401
                            TEACHER_BACKENDS, TEACHER_MODES, TEACHER_SIGNALS, TOPK_MODES)

DTYPES = ("auto",) + MODEL_DTYPES
DEMO_TASKS = ("sort", "chain")   # gold_jax/demo/task.py, gold_jax/demo/chain_task.py (build.TASKS)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0                     # host RNG (λ coins), JAX key, data order, rollout seeds
    c.run_dir = "runs/gold"        # metrics, TensorBoard, checkpoints, profiles, completions
    c.demo = ml_collections.ConfigDict()
    c.demo.cache_dir = "~/.cache/gold_jax/demo"  # built once: tokenizer, teacher, student, parquet files
    c.demo.preset = "full"         # full (the README demo) | tiny (tests)
    # Issue 18: sort (the README demo) | chain (long modular-arithmetic chains whose dataset
    # completions are in another style than the teacher's; gold_jax/demo/chain_task.py).
    c.demo.task = "sort"
    c.demo.eval_n = 256            # held-out prompts for the exact-match accuracy
    # H3: the demo task's data lengths (configs/gold.py sets them), applied only to a demo run that
    # left data.max_*_length at their defaults; 0 = keep data's.
    c.demo.max_prompt_length = 0
    c.demo.max_response_length = 0
    # XTOK-DEMO (issue 15): the demo's teacher with another tokenizer (demo/cross_build.py, built on first
    # use); needs gold.cross_tokenizer=True. configs/gold_cross.py sets both.
    # XTOK-DEMO2: "" = the demo's own teacher; "bytelevel" (another byte-level BPE, the Qwen <-> Llama 3 regime)
    # or "sentencepiece" (byte-fallback Metaspace BPE, few shared token strings: the hard case).
    c.demo.cross_teacher = ""

    c.model = ml_collections.ConfigDict()
    c.model.student_path = ""      # HF-format dir; "" = the demo student
    c.model.teacher_path = ""      # HF-format dir for the embedded teacher; "" = the demo teacher
    c.model.tokenizer_path = ""    # "" = the student's dir
    c.model.dtype = "auto"         # compute dtype; auto = bfloat16 on accelerators, float32 on CPU
    c.model.param_dtype = "float32"  # master weights and optimizer state stay float32
    # LoRA student (H9, models/lora.py; PEFT LoraConfig's r, lora_alpha, lora_dropout, target_modules).
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.rank = 0            # adapter rank r; 0 = train all parameters (LoRA off)
    c.model.lora.alpha = 16.0        # the update is scaled by alpha / rank (PEFT's lora_alpha)
    c.model.lora.dropout = 0.0       # dropout on the adapter input, in [0, 1) (PEFT's lora_dropout)
    c.model.lora.targets = "q,k,v,o,gate,up,down"   # of q,k,v,o,gate,up,down,lm_head,embed

    c.data = default_data_config()

    c.gold = ml_collections.ConfigDict()
    c.gold.beta = 0.5              # 0 = forward KL(teacher||student), 1 = reverse KL
    c.gold.lmbda = 0.5             # probability that a batch is student-generated (on-policy)
    c.gold.temperature = 0.9       # teacher/student softmax temperature and sampling temperature
    c.gold.seq_kd = False          # off-policy batches: teacher-generated completions
    c.gold.top_k = 64              # teacher top-k; 0 = full rows (dense JSD)
    c.gold.topk_mode = "tail"      # "tail" (k+1 bucket, exact) or "renormalize" (verl)
    # H8 (issue 14): the OPD family. loss "opd" trains student-sampled rows on the sampled-token reverse KL
    # used as a per-token advantage (gold_jax/losses/opd.py); off-policy rows keep the JSD.
    c.gold.loss = "jsd"            # jsd | opd
    c.gold.opd_coef = 1.0          # OPD reward scale: r_t = opd_coef * (log p_teacher(y_t) - log q_student(y_t))
    c.gold.opd_offpolicy_weight = 1.0  # opd runs: weight of the JSD on off-policy (dataset/teacher) rows; 0 skips them
    c.gold.importance_correction = False  # weight student rows by min(q_θ/q_behaviour, importance_cap) (TIS)
    c.gold.importance_cap = 2.0    # truncation c of the importance ratio (verl's TIS recipes use 2)
    c.gold.lmbda_granularity = "batch"  # batch: one λ coin per batch | sample: one coin per row
    c.gold.diagnostics = True      # teacher/topk_mass, student/mass_on_teacher_topk, gold/topk_overlap, ...
    # H7: what the teacher sends: "topk" (k log-probs + exact log-mass; gold.top_k=0 means full rows),
    # "full" (rows of V log-probs), "hidden" (its final normed hidden states, bf16; the trainer holds its
    # lm head and the fused loss is the exact dense JSD). teacher.mode="colocated" always trains on "hidden".
    c.gold.teacher_signal = "topk"
    # H10 (issue 15): a teacher with another tokenizer (gold_jax/crosstok). Same tokenizer fingerprint: the usual
    # path whatever this says; another tokenizer: refused unless True, then the teacher server aligns text spans
    # and the loss is TRL GOLD's ULD / hybrid (loss.impl "uld"). The uld_* keys are TRL GOLDConfig's, same meaning.
    c.gold.cross_tokenizer = False
    c.gold.uld_use_hybrid_loss = False       # JSD (gold.beta) on the shared vocabulary + ULD on the rest
    c.gold.uld_hybrid_matched_weight = None     # both None = adaptive (shared / teacher vocab, 1 - that)
    c.gold.uld_hybrid_unmatched_weight = None
    c.gold.uld_crossentropy_weight = 0.0     # x the student's NLL of its completion tokens
    c.gold.uld_distillation_weight = 1.0     # x the ULD / hybrid term
    c.gold.uld_student_temperature = 1.0     # student softmax temperature in the ULD / hybrid term
    c.gold.uld_teacher_temperature = 1.0     # the temperature the teacher scores at (cross-tokenizer runs)
    c.gold.uld_skip_student_eos = True       # student EOS positions are not in the loss
    c.gold.uld_skip_teacher_eos = True       # spans holding a teacher EOS are not in the loss
    c.gold.uld_token_merge_strategy = "observed"   # observed | bayesian: how a span's probabilities merge

    c.loss = ml_collections.ConfigDict()
    c.loss.impl = "auto"           # auto or a row of losses.registry.LOSSES: topk | fused | vocab_parallel | dense
    c.loss.chunk_size = 256        # fused lm-head chunk along tokens

    c.teacher = ml_collections.ConfigDict()
    # H7: "server" (a teacher server, embedded when teacher.address is empty) or "colocated" (the
    # teacher from model.teacher_path runs inside the jit'd train step, on the training mesh).
    c.teacher.mode = "server"
    c.teacher.address = ""         # tcp://host:15555; "" = start an embedded local teacher
    c.teacher.port = 0             # port of the embedded teacher (0 = any free port)
    c.teacher.backend = "jax"      # embedded teacher backend: jax | vllm
    c.teacher.dtype = "auto"       # embedded teacher weights+compute: auto (bf16 on accelerators, f32 on CPU) | float32 | bfloat16 | float16
    c.teacher.timeout_s = 60.0
    c.teacher.max_retries = 5
    c.teacher.max_in_flight = 4
    c.teacher.wait_s = 600.0       # how long the trainer waits for a lost teacher to come back
    c.teacher.cache_dir = ""       # off-policy top-k cache ("" = off)

    c.rollout = ml_collections.ConfigDict()
    c.rollout.engine = "jax"       # jax (embedded sampler) | vllm
    c.rollout.n_devices = 0        # devices reserved for rollout (0 = share the training devices)
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0
    c.rollout.sync_every = 1       # weight sync period (steps)
    c.rollout.gpu_memory_utilization = 0.15  # vLLM: share of (GPU, or host on CPU) memory for its KV cache

    c.trainer = ml_collections.ConfigDict()
    c.trainer.scheduler = "one_step_off"
    c.trainer.global_batch_size = 8   # sequences per optimizer step (all hosts)
    c.trainer.grad_accum_steps = 1    # micro-batches per step (lax.scan)
    c.trainer.num_epochs = 1
    c.trainer.max_steps = 100         # stop after this many steps (-1 = run the epochs)
    c.trainer.n_devices = 0           # training devices (0 = all not reserved for rollout)
    c.trainer.log_every = 1
    c.trainer.eval_every = 0          # validation loss period (0 = off)
    c.trainer.eval_batches = 2
    c.trainer.log_completions_every = 0
    c.trainer.log_completions_n = 2
    c.trainer.tensorboard = True
    c.trainer.progress_bar = True

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 1e-5
    c.optimizer.schedule = "cosine"   # cosine | linear | constant (after warmup)
    c.optimizer.warmup_steps = 0
    c.optimizer.min_lr_ratio = 0.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.max_grad_norm = 1.0   # 0 = no clipping

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # H6: start-up check (gold_jax/sharding/replication_check.py): with fsdp or tensor > 1, fail when more
    # than this share of parameter bytes is replicated on every device (a rule-table or mesh mistake).
    c.mesh.max_replicated_fraction = 0.25

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 100          # steps (0 = only at the end)
    c.checkpoint.keep = 3
    c.checkpoint.enabled = True
    c.checkpoint.resume = True        # resume from run_dir when a checkpoint exists

    c.profile = ml_collections.ConfigDict(dict(start_step=-1, num_steps=3))
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))
    # HOSTS: every process compares its batch decisions (λ coin, end of data, step) with the others before
    # each batch (distributed.StepCheck): every `check_every` batches (0 = never), failing after
    # `check_timeout_s` when a process does not report.
    c.distributed.check_every = 1
    c.distributed.check_timeout_s = 300.0
    return c


def _flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ValueError(f"config.{key}={value!r}: {why}")


def validate(cfg: ml_collections.ConfigDict, n_devices: int | None = None) -> None:
    """Raise ValueError naming the first unknown key or invalid value."""
    known, given = _flat(base_config()), _flat(cfg)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join('config.' + k for k in unknown)}")
    missing = sorted(k for k in set(known) - set(given) if not k.startswith("data."))
    if missing:
        raise ValueError(f"missing config key(s): {', '.join('config.' + k for k in missing)}")
    g, t, o = cfg.gold, cfg.trainer, cfg.optimizer
    for k in ("beta", "lmbda"):
        _check(0.0 <= g[k] <= 1.0, f"gold.{k}", g[k], "must be in [0, 1]")
    _check(math.isfinite(g.temperature) and g.temperature > 0, "gold.temperature", g.temperature, "must be > 0")
    _check(g.top_k >= 0, "gold.top_k", g.top_k, "must be >= 0 (0 = full rows)")
    _check(g.topk_mode in TOPK_MODES, "gold.topk_mode", g.topk_mode, f"must be one of {TOPK_MODES}")
    _check(g.loss in ("jsd", "opd"), "gold.loss", g.loss, "must be one of ('jsd', 'opd')")   # H8: OPD family
    _check(math.isfinite(g.opd_coef), "gold.opd_coef", g.opd_coef, "must be a finite number")
    _check(math.isfinite(g.opd_offpolicy_weight) and g.opd_offpolicy_weight >= 0, "gold.opd_offpolicy_weight",
           g.opd_offpolicy_weight, "must be >= 0 (0 skips off-policy rows)")
    _check(g.importance_cap > 0, "gold.importance_cap", g.importance_cap, "must be > 0")
    _check(g.lmbda_granularity in ("batch", "sample"), "gold.lmbda_granularity", g.lmbda_granularity,
           "must be one of ('batch', 'sample')")
    _check(not (g.lmbda_granularity == "sample" and g.seq_kd), "gold.lmbda_granularity", g.lmbda_granularity,
           "'sample' mixes student rows with dataset rows; it does not support gold.seq_kd=True")
    _check(g.loss == "jsd" or (g.get("teacher_signal", "topk") in ("topk", "full")
                               and cfg.teacher.get("mode", "server") == "server"), "gold.loss", g.loss,
           "'opd' needs the teacher's sampled-token log-probs: gold.teacher_signal topk or full, teacher.mode server")
    _check(g.teacher_signal in TEACHER_SIGNALS, "gold.teacher_signal", g.teacher_signal,   # H7
           f"must be one of {TEACHER_SIGNALS}")
    _check(cfg.teacher.mode in TEACHER_MODES, "teacher.mode", cfg.teacher.mode, f"must be one of {TEACHER_MODES}")
    config_checks.check_uld(cfg)   # H10 (issue 15): the uld_* keys and what cross_tokenizer=True cannot combine with
    _check(t.scheduler in SCHEDULERS, "trainer.scheduler", t.scheduler, f"must be one of {SCHEDULERS}")
    _check(cfg.loss.impl in registry.loss_impls(), "loss.impl", cfg.loss.impl,
           f"must be one of {registry.loss_impls()}")
    _check(cfg.loss.chunk_size > 0, "loss.chunk_size", cfg.loss.chunk_size, "must be > 0")
    _check(cfg.rollout.engine in ROLLOUT_ENGINES, "rollout.engine", cfg.rollout.engine,
           f"must be one of {ROLLOUT_ENGINES}")
    _check(cfg.teacher.backend in TEACHER_BACKENDS, "teacher.backend", cfg.teacher.backend,
           f"must be one of {TEACHER_BACKENDS}")
    _check(0.0 < cfg.rollout.top_p <= 1.0, "rollout.top_p", cfg.rollout.top_p, "must be in (0, 1]")
    _check(cfg.demo.preset in ("full", "tiny"), "demo.preset", cfg.demo.preset, "must be full or tiny")
    _check(cfg.demo.get("task", "sort") in DEMO_TASKS, "demo.task", cfg.demo.get("task"),
           f"must be one of {DEMO_TASKS}")   # issue 18
    _check(not (cfg.demo.get("cross_teacher", False) and cfg.demo.get("task", "sort") != "sort"), "demo.task",
           cfg.demo.get("task"), "the cross-tokenizer demo teacher (demo.cross_teacher) exists for sort only")
    _check(cfg.demo.eval_n >= 1, "demo.eval_n", cfg.demo.eval_n, "must be >= 1")
    for k in ("max_prompt_length", "max_response_length"):   # H3: the demo's data lengths
        _check(cfg.demo[k] >= 0, f"demo.{k}", cfg.demo[k], "must be >= 0 (0 = data's)")
    _check(cfg.demo.cross_teacher in ("", "bytelevel", "sentencepiece"), "demo.cross_teacher",   # XTOK-DEMO2
           cfg.demo.cross_teacher, "must be '' (the demo's own teacher), 'bytelevel' or 'sentencepiece'")
    _check(not cfg.demo.cross_teacher or cfg.gold.cross_tokenizer, "demo.cross_teacher", cfg.demo.cross_teacher,
           "the cross-tokenizer demo teacher has another tokenizer: set gold.cross_tokenizer=True too")
    _check(not cfg.demo.cross_teacher or cfg.demo.get("task", "sort") == "sort", "demo.cross_teacher",
           cfg.demo.cross_teacher, "the cross-tokenizer demo teacher is trained on the sorting task (demo.task='sort')")
    _check(0.0 < cfg.rollout.gpu_memory_utilization <= 1.0, "rollout.gpu_memory_utilization",
           cfg.rollout.gpu_memory_utilization, "must be in (0, 1]")
    _check(cfg.rollout.sync_every >= 1, "rollout.sync_every", cfg.rollout.sync_every, "must be >= 1")
    _check(cfg.distributed.check_every >= 0, "distributed.check_every", cfg.distributed.check_every,   # HOSTS
           "must be >= 0 (0 = never)")
    _check(cfg.distributed.check_timeout_s > 0, "distributed.check_timeout_s", cfg.distributed.check_timeout_s,
           "must be > 0 seconds")
    _check(cfg.model.dtype in DTYPES, "model.dtype", cfg.model.dtype, f"must be one of {DTYPES}")
    _check(cfg.teacher.dtype in DTYPES, "teacher.dtype", cfg.teacher.dtype, f"must be one of {DTYPES}")
    from gold_jax.lora_config import config_errors as lora_errors   # H9: LoRA keys (no jax import)
    for key, value, problem in lora_errors(cfg.model.lora):
        _check(False, key, value, problem)
    # With LoRA the base weights are frozen (param_dtype may be bfloat16); adapters stay float32.
    _check(cfg.model.param_dtype == "float32" or (cfg.model.lora.rank > 0 and cfg.model.param_dtype == "bfloat16"),
           "model.param_dtype", cfg.model.param_dtype,
           "master weights must be float32 (bfloat16 is allowed for a LoRA student's frozen base)")
    _check(t.global_batch_size >= 1, "trainer.global_batch_size", t.global_batch_size, "must be >= 1")
    _check(t.grad_accum_steps >= 1, "trainer.grad_accum_steps", t.grad_accum_steps, "must be >= 1")
    _check(t.global_batch_size % t.grad_accum_steps == 0, "trainer.grad_accum_steps", t.grad_accum_steps,
           f"must divide trainer.global_batch_size={t.global_batch_size}")
    _check(t.num_epochs >= 1, "trainer.num_epochs", t.num_epochs, "must be >= 1")
    _check(t.max_steps == -1 or t.max_steps >= 1, "trainer.max_steps", t.max_steps, "must be >= 1 or -1")
    _check(t.log_every >= 1, "trainer.log_every", t.log_every, "must be >= 1")
    _check(o.lr > 0, "optimizer.lr", o.lr, "must be > 0")
    _check(o.schedule in LR_SCHEDULES, "optimizer.schedule", o.schedule, f"must be one of {LR_SCHEDULES}")
    _check(o.warmup_steps >= 0, "optimizer.warmup_steps", o.warmup_steps, "must be >= 0")
    _check(0.0 <= o.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    _check(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "must be >= 0")
    _check(o.max_grad_norm >= 0, "optimizer.max_grad_norm", o.max_grad_norm, "must be >= 0 (0 = off)")
    for k in ("b1", "b2"):
        _check(0.0 <= o[k] < 1.0, f"optimizer.{k}", o[k], "must be in [0, 1)")
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", cfg.checkpoint.keep, "must be >= 1")
    _check(cfg.checkpoint.every >= 0, "checkpoint.every", cfg.checkpoint.every, "must be >= 0")
    _check(bool(cfg.run_dir), "run_dir", cfg.run_dir, "must not be empty")
    _check(0.0 <= cfg.mesh.max_replicated_fraction <= 1.0, "mesh.max_replicated_fraction",  # H6
           cfg.mesh.max_replicated_fraction, "must be in [0, 1]")
    for k in ("max_prompt_length", "max_response_length"):
        if k in cfg.data:
            _check(cfg.data[k] >= 1, f"data.{k}", cfg.data[k], "must be >= 1")
    # Combinations that would crash inside the loss or at start-up, then every path, before any model loads.
    config_checks.check_combinations(cfg)
    config_checks.check_paths(cfg)
    if n_devices is not None:
        validate_devices(cfg, n_devices)


def split_devices(cfg: ml_collections.ConfigDict, n_devices: int) -> tuple[int, int]:
    """(training devices, rollout devices); rollout 0 = shares the training devices."""
    n_roll = cfg.rollout.n_devices
    _check(0 <= n_roll < n_devices, "rollout.n_devices", n_roll,
           f"must be in [0, {n_devices}) ({n_devices} devices, training needs at least one)")
    n_train = cfg.trainer.n_devices or (n_devices - n_roll)
    _check(1 <= n_train <= n_devices - n_roll, "trainer.n_devices", cfg.trainer.n_devices,
           f"training and rollout devices ({n_roll}) must fit in the {n_devices} devices")
    return n_train, n_roll


def validate_devices(cfg: ml_collections.ConfigDict, n_devices: int) -> tuple[int, int, int]:
    """Check the mesh against the training devices; returns the resolved mesh sizes."""
    from gold_jax.sharding.mesh import mesh_sizes
    n_train, _ = split_devices(cfg, n_devices)
    try:
        sizes = mesh_sizes(cfg.mesh, n_train)
    except ValueError as e:
        raise ValueError(f"config.mesh: {e}") from None
    batch_shards = sizes[0] * sizes[1]
    per = cfg.trainer.global_batch_size // cfg.trainer.grad_accum_steps
    _check(per % batch_shards == 0, "trainer.global_batch_size", cfg.trainer.global_batch_size,
           f"each of the {cfg.trainer.grad_accum_steps} micro-batches ({per} rows) must split over "
           f"mesh data*fsdp={batch_shards}")
    return sizes


def resolve_dtype(name: str, platform: str) -> str:
    if name != "auto":
        return name
    return "float32" if platform == "cpu" else "bfloat16"


def expand(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path)) if path else path

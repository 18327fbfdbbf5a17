"""Validation JSD of a finished run's checkpoint: `python -m gold_jax.eval --run DIR` on a real-model run.

The same measurement as the trainer's `eval/jsd_loss`: the run's validation rows
(config.data.val_files), scored by its teacher through the same wait-and-resend
path (batches.BatchProducer.score_now), and the jit'd train_step.eval_loss on the
run's mesh, loss implementation, β and temperature. With the default row count
(trainer.eval_batches batches) the figure is the one the run logged at that step.
"""
from __future__ import annotations

import math
import os
from typing import Any

from gold_jax import cli_errors


def _run_config(run: str, data: str | None) -> Any:
    """The run's saved config over today's defaults (keys added since the run keep their defaults)."""
    from gold_jax import config as config_lib
    from gold_jax.export import load_run_config
    saved = load_run_config(run)
    cfg = config_lib.base_config()
    cfg.update(saved.to_dict())
    with cfg.unlocked():
        if data is not None:
            cfg.data.val_files = data
        # One process, every device for the loss; nothing cached or written into the run.
        cfg.rollout.n_devices = cfg.trainer.n_devices = 0
        cfg.teacher.cache_dir = ""
    if not cfg.data.val_files:
        raise cli_errors.UserError(
            f"run {run} trained {cfg.model.student_path}, not the demo task, so it is scored by the validation "
            "JSD, and its config.data.val_files is empty: pass --data FILE (a validation file in the run's "
            "data format), or train with --config.data.val_files=FILE")
    for f in str(cfg.data.val_files).split(","):
        if f.strip() and not os.path.exists(os.path.expanduser(f.strip())):
            raise FileNotFoundError(f"validation file {f.strip()!r} (config.data.val_files of run {run}, or --data) "
                                    "does not exist")
    return cfg


def validation_jsd(run: str, *, step: int | None = None, n: int | None = None,
                   data: str | None = None) -> dict[str, Any]:
    """{"eval/jsd_loss", "n" (rows), "tokens", "eval_file", "source"} of checkpoint `step` (None = latest).

    n: rows to score, rounded up to whole batches of trainer.global_batch_size; None = the run's
    own trainer.eval_batches batches.
    """
    cfg = _run_config(run, data)
    import jax
    import numpy as np
    from flax import nnx

    from gold_jax import components, config as config_lib
    from gold_jax.batches import BatchProducer, seq_from_data, train_arrays
    from gold_jax.data.pipeline import iterate
    from gold_jax.export import load_student
    from gold_jax.fingerprint import tokenizer_size
    from gold_jax.models.partition import shard_model
    from gold_jax.train_step import eval_loss
    from gold_jax.trainer import _global, loss_spec

    devices = components.make_devices(cfg)
    mesh = devices.mesh
    dtype = config_lib.resolve_dtype(cfg.model.dtype, jax.devices()[0].platform)
    net, tokenizer, _ = load_student(run, step, dtype=dtype)
    graphdef, params = nnx.split(shard_model(net, mesh))
    spec = loss_spec(cfg, mesh, tokenizer_size(tokenizer))
    eval_fn = jax.jit(lambda p, b: eval_loss(p, b, graphdef=graphdef, spec=spec, mesh=mesh))
    bs = int(cfg.trainer.global_batch_size)
    n_batches = int(cfg.trainer.eval_batches) if n is None else math.ceil(n / bs)
    teacher = components.connect_teacher(cfg, net, tokenizer)
    try:
        ds = components.make_data(cfg, tokenizer, "val")
        producer = BatchProducer(cfg, None, None, teacher, np.random.default_rng(0))
        total = count = 0.0
        rows = 0
        for i, batch in zip(range(n_batches), iterate(ds, cfg.data)):
            seq = seq_from_data(batch)
            scores = producer.score_now(seq, f"scoring validation batch {i}")
            s, c = jax.device_get(eval_fn(params, _global(mesh, train_arrays(seq, scores))))
            total, count, rows = total + float(s), count + float(c), rows + seq.prompt_ids.shape[0]
    finally:
        teacher.close()
    if rows == 0:
        raise cli_errors.UserError(f"config.data.val_files={cfg.data.val_files!r} yields no full batch of "
                                   f"trainer.global_batch_size={bs} rows")
    return {"eval/jsd_loss": total / max(count, 1.0), "n": rows, "tokens": int(count),
            "eval_file": str(cfg.data.val_files), "source": f"{run} (step {'latest' if step is None else step})"}

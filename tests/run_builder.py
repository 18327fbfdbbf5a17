"""Tiny run directories for the CLI tests, without training: a config.json and one checkpoint.

A real run would take a minute of XLA compiles; export, eval and the CLIs need only what a
run leaves behind (its saved config and a checkpoint of the student's training state).
Also the one tiny-run config builder (conftest's `tiny_run_config` and the vllm tests use it) and
the kill-and-resume runs of the resume tests.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model_dir(root: str, name: str, tok, *, hidden: int, layers: int, seed: int,
                   dtype: str = "float32") -> str:
    """A qwen3-shaped HF folder (config.json, model.safetensors in `dtype`, tokenizer)."""
    from gold_jax.export import cast_params
    from gold_jax.models import ModelConfig, init_model
    from gold_jax.models.hf_io import save_pretrained
    cfg = ModelConfig(architecture="qwen3", vocab_size=len(tok.get_vocab()), hidden_size=hidden,
                      intermediate_size=2 * hidden, num_layers=layers, num_heads=2, num_kv_heads=1, head_dim=16,
                      qk_norm=True, max_position_embeddings=128, eos_token_id=tok.eos_token_id)
    model = init_model(cfg, seed=seed)
    if dtype != "float32":
        model = cast_params(model, dtype)
    path = os.path.join(root, name)
    save_pretrained(model, path)
    tok.save_pretrained(path)
    return path


def demo_task_files(root: str, n_train: int = 32, n_val: int = 16) -> tuple[str, str]:
    from gold_jax.demo import task
    rng = np.random.default_rng(0)
    rows = [task.make_row(rng.integers(0, 10, 4), "train", i) for i in range(n_train + n_val)]
    train, val = os.path.join(root, "train.parquet"), os.path.join(root, "val.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:n_train]), train)
    pq.write_table(pa.Table.from_pylist(rows[n_train:]), val)
    return train, val


def override(c, over: dict):
    """Set dotted-key overrides (`{"trainer.max_steps": 6}`) on the ConfigDict `c` in place; returns `c`."""
    for k, v in over.items():
        node = c
        *head, last = k.split(".")
        for h in head:
            node = node[h]
        node[last] = v
    return c


def tiny_config(run_dir: str, assets: dict | None = None, **over):
    """configs/tiny.py with run_dir, the student/teacher/data paths of `assets` (keys student, teacher,
    train, val) when given, and dotted-key overrides."""
    from configs import tiny
    c = tiny.get_config()
    c.run_dir = str(run_dir)
    if assets is not None:
        c.model.student_path, c.model.teacher_path = assets["student"], assets["teacher"]
        c.data.train_files, c.data.val_files = assets["train"], assets["val"]
    return override(c, over)


def make_run(cfg, step: int = 1, noise: float = 0.0) -> str:
    """Write cfg's run_dir as a finished run would leave it: config.json and checkpoint `step`
    holding the student's weights (plus `noise`, so that a test can tell them from the original)."""
    import jax
    from flax import nnx

    from gold_jax import components
    from gold_jax.checkpoint import Checkpointer
    from gold_jax.models.hf_io import load_pretrained
    from gold_jax.train_step import init_state, make_optimizer
    run_dir = str(cfg.run_dir)
    components.write_config(cfg, run_dir)
    model = load_pretrained(cfg.model.student_path, dtype="float32")
    _, params = nnx.split(model)
    if noise:
        keys = iter(jax.random.split(jax.random.key(step), len(jax.tree.leaves(params))))
        params = jax.tree.map(lambda x: x + noise * jax.random.normal(next(keys), x.shape, x.dtype), params)
    tx, _ = make_optimizer(cfg.optimizer, 1)
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=2)
    try:
        ckpt.save(step, init_state(params, tx), {"step": step}, [])
    finally:
        ckpt.close()
    return run_dir


def run_killed_after_step(cfg, step: int = 3) -> subprocess.CompletedProcess:
    """Train `cfg` in a subprocess that SIGKILLs itself right after step `step`'s metrics row.

    The test's own hook (it wraps the metrics writer), not the trainer's: production has no kill switch.
    """
    script = ("import json, os, signal, ml_collections\n"
              "from gold_jax.trainer import Trainer\n"
              f"t = Trainer(ml_collections.ConfigDict(json.loads({cfg.to_json()!r})))\n"
              "write = t.writer.write\n"
              "def write_then_die(step, rec, kind='train'):\n"
              "    write(step, rec, kind)\n"
              f"    if kind == 'train' and step == {int(step)}:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "t.writer.write = write_then_die\n"
              "t.run()\n")
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)


def ref_and_killed_runs(make_cfg, root, over: dict, step: int = 3) -> tuple:
    """Train `make_cfg(dir, **over)` twice under `root`: straight through in root/"ref", and in
    root/"killed" SIGKILLed right after step `step`'s metrics row, then resumed from its checkpoint.
    Returns (ref_dir, kill_dir), for a test to compare their metrics."""
    from gold_jax.trainer import Trainer
    ref_dir, kill_dir = root / "ref", root / "killed"
    Trainer(make_cfg(ref_dir, **over)).run()
    p = run_killed_after_step(make_cfg(kill_dir, **over), step)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    Trainer(make_cfg(kill_dir, **over)).run()
    return ref_dir, kill_dir

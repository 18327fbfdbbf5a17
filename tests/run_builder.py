"""Tiny run directories for the CLI tests, without training: a config.json and one checkpoint.

A real run would take a minute of XLA compiles; export, eval and the CLIs need only what a
run leaves behind (its saved config and a checkpoint of the student's training state).
"""
from __future__ import annotations

import importlib.util
import os

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


def tiny_config(run_dir: str, **over):
    """configs/tiny.py with run_dir and dotted-key overrides."""
    spec = importlib.util.spec_from_file_location("tiny_cfg", os.path.join(REPO, "configs", "tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.run_dir = str(run_dir)
    for k, v in over.items():
        node = c
        *head, last = k.split(".")
        for h in head:
            node = node[h]
        node[last] = v
    return c


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

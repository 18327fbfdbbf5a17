r"""Export a run's student as an HF-format folder: `python -m gold_jax.export --run DIR --out HF_DIR`.

The folder holds config.json, model.safetensors, the tokenizer and a
generation_config.json, and loads with transformers' from_pretrained and vLLM.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
from absl import app, flags
from flax import nnx

from gold_jax.checkpoint import Checkpointer


def load_run_config(run_dir: str) -> ml_collections.ConfigDict:
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} is not a gold_jax run directory (no config.json)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_student(run_dir: str, step: int | None = None) -> tuple[nnx.Module, Any, ml_collections.ConfigDict]:
    """(student with the checkpointed weights, tokenizer, run config); step None = the latest."""
    from gold_jax.data import load_tokenizer
    from gold_jax.models.hf_io import load_pretrained
    from gold_jax.train_step import init_state, make_optimizer
    cfg = load_run_config(run_dir)
    model = load_pretrained(cfg.model.student_path, dtype="float32")
    graphdef, params = nnx.split(model)
    tx, _ = make_optimizer(cfg.optimizer, 1)
    like = jax.eval_shape(lambda p: init_state(p, tx), params)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), like)
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=max(int(cfg.checkpoint.keep), 1))
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints")
        state, _, _ = ckpt.restore(step, like)
    finally:
        ckpt.close()
    tokenizer = load_tokenizer(cfg.model.tokenizer_path or cfg.model.student_path)
    return nnx.merge(graphdef, state.params), tokenizer, cfg


def export(run_dir: str, out_dir: str, step: int | None = None) -> str:
    from gold_jax.models.hf_io import save_pretrained
    model, tokenizer, _ = load_student(run_dir, step)
    save_pretrained(model, out_dir)
    tokenizer.save_pretrained(out_dir)
    gen = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.bos_token_id}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({k: v for k, v in gen.items() if v is not None}, f, indent=2)
    return out_dir


FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    print(export(FLAGS.run, FLAGS.out, FLAGS.step))


if __name__ == "__main__":
    flags.DEFINE_string("run", None, "run directory (holds config.json and checkpoints/)", required=True)
    flags.DEFINE_string("out", None, "output HF-format folder", required=True)
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
    app.run(main)

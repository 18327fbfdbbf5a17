r"""Test-size config: tiny batches and lengths, a few steps, no progress bar.

    python -m gold_jax.train --config configs/tiny.py --config.model.student_path=... \
        --config.model.teacher_path=... --config.data.train_files=...
"""
from gold_jax.config import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.run_dir = "runs/tiny"
    c.trainer.global_batch_size = 8
    c.trainer.max_steps = 4
    c.trainer.progress_bar = False
    c.trainer.tensorboard = False
    c.gold.top_k = 8
    c.optimizer.lr = 3e-3
    c.optimizer.schedule = "constant"
    c.checkpoint.every = 2
    c.checkpoint.keep = 2
    if "max_prompt_length" in c.data:
        c.data.max_prompt_length = 16
        c.data.max_response_length = 8
    return c

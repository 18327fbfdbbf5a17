"""The demo's exact-match accuracy as a trainer evaluation hook.

One greedy JaxSampler is built once and fed the current weights at each call,
so evaluation compiles once per run instead of once per evaluation.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow.parquet as pq
from flax import nnx

from gold_jax.demo.evaluate import evaluate_accuracy
from gold_jax.rollout.jax_sampler import JaxSampler


class DemoAccuracy:
    """evaluate(student) -> {"eval/accuracy": ..., "eval/well_formed": ...} on the first `n` held-out rows."""

    def __init__(self, eval_file: str, model: nnx.Module, tokenizer: Any, *, n: int = 256):
        rows = pq.read_table(eval_file).to_pylist()
        if not rows:
            raise ValueError(f"demo eval file {eval_file} has no rows")
        self.rows, self.tokenizer = rows[:n], tokenizer
        self.sampler = JaxSampler(model, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)

    def evaluate(self, student: Callable[[], nnx.Module]) -> dict[str, float]:
        self.sampler.sync_weights(student())
        res = evaluate_accuracy(self.sampler, self.tokenizer, self.rows, batch_size=len(self.rows))
        return {"eval/accuracy": res["accuracy"], "eval/well_formed": res["well_formed"]}

    def end_of_run(self) -> None:
        pass

    def close(self) -> None:
        self.sampler.close()

"""Exact-match accuracy on the demo task with greedy generation.

Generation goes through the embedded JAX sampler (the same engine as on-policy
rollouts); every batch is padded to one shape so evaluation compiles once.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from gold_jax.demo import chain_task, task
from gold_jax.demo.sft import encode_rows
from gold_jax.rollout.jax_sampler import JaxSampler

MAX_NEW_TOKENS = 16  # the longest demo answer is 2 * max_len tokens + EOS, well under this


def task_of(rows: Sequence[Mapping[str, Any]]):
    """The task module that scores `rows` (by verl's data_source): the chain task or sorting."""
    chain = [r.get("data_source") == chain_task.DATA_SOURCE for r in rows]
    if any(chain) and not all(chain):
        raise ValueError("rows mix the chain task with another task; evaluate one task at a time")
    return chain_task if rows and chain[0] else task


def default_max_new_tokens(rows: Sequence[Mapping[str, Any]]) -> int:
    return chain_task.MAX_NEW_TOKENS if task_of(rows) is chain_task else MAX_NEW_TOKENS


def greedy_completions(model_or_sampler: nnx.Module | JaxSampler, tokenizer: Any,
                       rows: Sequence[Mapping[str, Any]], *, batch_size: int = 256,
                       max_new_tokens: int | None = None, progress: bool = False) -> list[str]:
    """Greedy completion text for every row (special tokens dropped); max_new_tokens None = the task's."""
    if not rows:
        raise ValueError("rows is empty")
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(rows)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sampler = model_or_sampler
    if isinstance(model_or_sampler, nnx.Module):
        sampler = JaxSampler(model_or_sampler, eos_id=tokenizer.eos_token_id,
                             pad_id=tokenizer.pad_token_id)
    elif not isinstance(model_or_sampler, JaxSampler):
        raise TypeError(f"model_or_sampler must be an nnx.Module or JaxSampler, "
                        f"got {type(model_or_sampler).__name__}")
    enc = encode_rows(tokenizer, [{"prompt": r["prompt"]} for r in rows])
    n, bs = len(rows), min(batch_size, len(rows))
    texts: list[str] = []
    for start in tqdm(range(0, n, bs), desc="eval", disable=not progress, leave=False):
        idx = np.arange(start, start + bs) % n  # the last batch wraps around: one shape only
        out = sampler.generate(enc.prompt_ids[idx], enc.prompt_mask[idx], n=1,
                               max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
        for i in range(min(bs, n - start)):
            ids = out.completion_ids[i][out.completion_mask[i] == 1]
            texts.append(tokenizer.decode(ids.tolist(), skip_special_tokens=True))
    return texts


def evaluate_accuracy(model_or_sampler: nnx.Module | JaxSampler, tokenizer: Any,
                      rows: Sequence[Mapping[str, Any]], *, batch_size: int = 256,
                      max_new_tokens: int | None = None, progress: bool = False) -> dict[str, float]:
    """{"accuracy": exact-match share, "well_formed": share of well-formed answers, "n": rows}.

    The task (sorting or chain, by the rows' data_source) scores and formats; chain: final answer only.
    """
    texts = greedy_completions(model_or_sampler, tokenizer, rows, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, progress=progress)
    tmod = task_of(rows)
    correct = [tmod.score_completion(r, t) for r, t in zip(rows, texts)]
    formed = [tmod.is_well_formed(t) for t in texts]
    return {"accuracy": float(np.mean(correct)), "well_formed": float(np.mean(formed)),
            "n": float(len(rows))}

"""A small supervised trainer for the demo's teacher and the student's warm-up.

Cross-entropy on completion tokens only (the prompt is context, not a target),
optax adamw with warm-up + cosine decay, one jit'd step over fixed shapes so it
compiles once. Single device: demo models are tiny.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from gold_jax.types import SequenceBatch


def encode_rows(tokenizer: Any, rows: Sequence[Mapping[str, Any]], *, prompt_len: int | None = None,
                completion_len: int | None = None, response_key: str = "response") -> SequenceBatch:
    """Chat-template prompts (left-padded) + responses ending in EOS (right-padded).

    With a length of None the longest row decides; a row longer than a given
    length is an error (silently truncating an answer would corrupt the targets).
    """
    if not rows:
        raise ValueError("rows is empty")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None or pad is None:
        raise ValueError("tokenizer needs eos_token_id and pad_token_id")
    prompts, comps = [], []
    for i, row in enumerate(rows):
        if "prompt" not in row:
            raise ValueError(f"row {i} has no 'prompt' key (verl format: list of chat messages)")
        p = tokenizer.apply_chat_template(list(row["prompt"]), add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
        prompts.append(list(p))
        if response_key in row:
            comps.append(tokenizer(str(row[response_key]), add_special_tokens=False)["input_ids"] + [eos])
        else:
            comps.append([])
    plen = prompt_len or max(len(p) for p in prompts)
    clen = completion_len or max(1, max(len(c) for c in comps))
    for name, seqs, n in (("prompt_len", prompts, plen), ("completion_len", comps, clen)):
        longest = max(len(s) for s in seqs)
        if longest > n:
            raise ValueError(f"{name}={n} is shorter than the longest row ({longest} tokens)")
    b = len(rows)
    out = SequenceBatch(np.full((b, plen), pad, np.int32), np.zeros((b, plen), np.int32),
                        np.full((b, clen), pad, np.int32), np.zeros((b, clen), np.int32))
    for i, (p, c) in enumerate(zip(prompts, comps)):
        out.prompt_ids[i, plen - len(p):] = p
        out.prompt_mask[i, plen - len(p):] = 1
        out.completion_ids[i, :len(c)] = c
        out.completion_mask[i, :len(c)] = 1
    return out


def completion_nll(model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array,
                   completion_ids: jax.Array, completion_mask: jax.Array) -> jax.Array:
    """Mean negative log-likelihood per completion token (types.py layout)."""
    p, r = input_ids.shape[1] - completion_ids.shape[1], completion_ids.shape[1]
    logits = model(input_ids, attention_mask)[:, p - 1:p + r - 1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(logp, completion_ids[..., None], axis=-1)[..., 0]
    m = completion_mask.astype(jnp.float32)
    return -(tok * m).sum() / jnp.maximum(m.sum(), 1.0)


def sft_train(model: nnx.Module, data: SequenceBatch, *, steps: int, batch_size: int = 64,
              learning_rate: float = 3e-3, weight_decay: float = 0.01, warmup_steps: int = 50,
              seed: int = 0, progress: bool = True, desc: str = "sft",
              callback: Callable[[int, nnx.Module], bool] | None = None,
              callback_every: int = 0) -> list[float]:
    """Train `model` in place on `data` for `steps` steps; returns the per-step losses.

    With `callback`, every `callback_every` steps the model is updated in place
    and `callback(step, model)` is called; a True return stops training there
    (the demo warms the student up only until it reaches a target accuracy).
    """
    n = data.prompt_ids.shape[0]
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size={batch_size} must be in [1, {n}] (the number of rows)")
    if callback is not None and callback_every < 1:
        raise ValueError(f"callback_every must be >= 1 with a callback, got {callback_every}")
    sched = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(warmup_steps, steps - 1),
                                               steps, end_value=learning_rate * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=weight_decay))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, ids, mask, cids, cmask):
        def loss_fn(pr):
            return completion_nll(nnx.merge(graphdef, pr, rest), ids, mask, cids, cmask)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    ids, mask = data.input_ids, data.attention_mask
    rng = np.random.default_rng(seed)
    order, pos, losses = rng.permutation(n), 0, []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        if pos + batch_size > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        params, opt_state, loss = step(params, opt_state, ids[idx], mask[idx],
                                       data.completion_ids[idx], data.completion_mask[idx])
        losses.append(loss)
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}")
        if callback is not None and len(losses) % callback_every == 0:
            nnx.update(model, params)
            if callback(len(losses), model):
                break
    bar.close()
    nnx.update(model, params)
    return [float(x) for x in jax.device_get(losses)]

"""Data pipeline throughput vs a tiny CPU training step: is loading ever the bottleneck?

Writes N synthetic prompt/response rows (jsonl), trains a small BPE tokenizer,
then times, in one run:
  1. tokenisation (read + chat template + tokenise + masks), rows/s;
  2. the grain iterator (shuffle, global batch, bucketed padding) over the
     tokenised rows, rows/s and seconds per batch;
  3. one jit-compiled training step (forward, loss, grads, adamw) of a tiny
     decoder on batches of the same shape,
and prints the ratio of data time to step time per batch.

    python benchmarks/data_bench.py [--rows 100000] [--batch 8]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from gold_jax.data import build_dataset, default_data_config, make_iterator, train_tokenizer  # noqa: E402
from gold_jax.models.config import ModelConfig  # noqa: E402
from gold_jax.models.decoder import Decoder  # noqa: E402

WORDS = ("the a of to and in is was for on that with as by it at from this be are or one two three four five "
         "six seven eight nine ten plus minus times equals answer question what how why step first then so "
         "number sum total result model student teacher learns").split()


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [{"prompt": [{"role": "user", "content": f"{words(rng.randint(8, 60))} {i}?"}],
             "response": f"{words(rng.randint(8, 90))} {rng.randint(0, 9999)}."} for i in range(n)]


def tiny_train_step(vocab: int, batch: int, p: int, r: int):
    """A jit'd step of a ~1M-parameter decoder: cross-entropy on completion tokens, adamw."""
    cfg = ModelConfig(architecture="qwen2", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=p + r)
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    tx = optax.adamw(1e-3)
    opt = tx.init(params)

    def loss_fn(params, ids, mask, loss_mask):
        logits = nnx.merge(graphdef, params)(ids, mask)[:, p - 1:-1]
        lp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(lp, ids[:, p:, None], -1)[..., 0]
        return (nll * loss_mask).sum() / jnp.maximum(loss_mask.sum(), 1)

    @jax.jit
    def step(params, opt, ids, mask, loss_mask):
        loss, g = jax.value_and_grad(loss_fn)(params, ids, mask, loss_mask)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    def run(b: dict) -> float:
        nonlocal params, opt
        ids = np.concatenate([b["prompt_ids"], b["completion_ids"]], 1)
        mask = np.concatenate([b["prompt_mask"], b["completion_mask"]], 1)
        params, opt, loss = step(params, opt, ids, mask, b["completion_mask"].astype(np.float32))
        return float(loss)  # blocks until the step is done
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=128, help="max prompt and max response length")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    rows = synthetic_rows(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        tok = train_tokenizer((r["prompt"][0]["content"] + " " + r["response"] for r in rows[:2000]), 1024)
        cfg = default_data_config()
        cfg.train_files = path
        cfg.max_prompt_length = cfg.max_response_length = args.max_len
        cfg.min_bucket = 32

        t0 = time.perf_counter()
        ds, stats = build_dataset(cfg, tok, global_batch_size=args.batch)
        t_tok = time.perf_counter() - t0
        n_batches = stats.rows_kept // args.batch
        it = make_iterator(cfg, tok, global_batch_size=args.batch)  # tokenises again; not timed
        t0 = time.perf_counter()
        batches = [next(it) for _ in range(n_batches)]
        t_iter = time.perf_counter() - t0

    print(f"rows: {args.rows} synthetic (chat-template prompt + response), kept {stats.rows_kept}, "
          f"truncated prompts/responses {stats.truncated_prompts}/{stats.truncated_responses}")
    print(f"tokenise (read + template + tokenise + masks): {t_tok:.2f} s = {args.rows / t_tok:,.0f} rows/s")
    print(f"grain iterator (shuffle + batch {args.batch} + bucketed padding): {t_iter:.2f} s for {n_batches} "
          f"batches = {n_batches * args.batch / t_iter:,.0f} rows/s, {1e3 * t_iter / n_batches:.3f} ms/batch")
    e2e = args.rows / (t_tok + t_iter)
    print(f"end to end, one epoch: {e2e:,.0f} rows/s")

    shapes = {(b["prompt_ids"].shape[1], b["completion_ids"].shape[1]) for b in batches}
    p, r = max(shapes)
    big = [b for b in batches if (b["prompt_ids"].shape[1], b["completion_ids"].shape[1]) == (p, r)]
    run = tiny_train_step(len(tok), args.batch, p, r)
    run(big[0])  # compile
    t0 = time.perf_counter()
    for i in range(args.steps):
        run(big[i % len(big)])
    t_step = (time.perf_counter() - t0) / args.steps
    data_per_batch = t_iter / n_batches
    print(f"bucket shapes seen (P, R): {sorted(shapes)}")
    print(f"tiny CPU train step (2 layers, hidden 64, batch {args.batch} x {p + r} tokens): "
          f"{1e3 * t_step:.1f} ms/step on {jax.devices()[0].platform}")
    print(f"data / step time per batch: {data_per_batch / t_step:.4f} "
          f"({1e3 * data_per_batch:.3f} ms vs {1e3 * t_step:.1f} ms)")
    # One-time tokenisation, amortised over one epoch of steps.
    amort = (t_tok + t_iter) / n_batches
    print(f"including one-time tokenisation amortised over one epoch: {1e3 * amort:.3f} ms/batch "
          f"= {amort / t_step:.4f} of a step")
    verdict = "is NOT" if amort < 0.1 * t_step else "IS"
    print(f"=> data loading {verdict} the bottleneck of a CPU training step")


if __name__ == "__main__":
    main()

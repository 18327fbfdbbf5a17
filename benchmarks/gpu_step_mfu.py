"""MFU of the jit'd GOLD train step (student forward + top-k JSD + backward + AdamW) on one accelerator.

    python benchmarks/gpu_step_mfu.py [--small]   # --small: a CPU-sized smoke run

A Qwen3-0.6B-shaped student (fewer layers to keep compilation short), random
weights, bf16 compute with float32 master weights, a random top-k teacher.
MFU = flops_per_token (6N + attention, PaLM convention) x tokens/s / device peak.
"""
from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gold_jax.metrics import peak_flops
from gold_jax.models import ModelConfig, init_model
from gold_jax.models.flops import flops_per_token
from gold_jax.train_step import LossSpec, init_state, make_optimizer, train_step


def main() -> None:
    small = "--small" in sys.argv
    vocab, k = (4096, 16) if small else (151936, 64)
    cfg = ModelConfig(architecture="qwen3", vocab_size=vocab, hidden_size=256 if small else 1024,
                      intermediate_size=768 if small else 3072, num_layers=2 if small else 12,
                      num_heads=4 if small else 16, num_kv_heads=2 if small else 8, head_dim=64 if small else 128,
                      qk_norm=True, dtype="float32" if small else "bfloat16", remat="none" if small else "dots",
                      max_position_embeddings=4096)
    b, p, r = (4, 64, 64) if small else (16, 256, 768)
    model = init_model(cfg, seed=0)
    graphdef, params = nnx.split(model)
    opt = SimpleNamespace(lr=1e-5, schedule="constant", warmup_steps=0, min_lr_ratio=0.0, weight_decay=0.0,
                          b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=1.0)
    tx, sched = make_optimizer(opt, 100)
    state = init_state(params, tx)
    rng = np.random.default_rng(0)
    lp = np.sort(rng.normal(size=(b, r, k)).astype(np.float32), -1)[..., ::-1] - 5.0
    batch = {"input_ids": rng.integers(0, vocab, (b, p + r)).astype(np.int32),
             "attention_mask": np.ones((b, p + r), np.int32), "completion_mask": np.ones((b, r), np.int32),
             "teacher_logprobs": np.ascontiguousarray(lp),
             "teacher_ids": np.stack([rng.permutation(vocab)[:k] for _ in range(b * r)]).reshape(b, r, k).astype(np.int32)}
    batch = {kk: jnp.asarray(v) for kk, v in batch.items()}
    rows = []
    for impl in ("topk", "fused"):
        spec = LossSpec(impl=impl, beta=0.5, temperature=0.9, chunk_size=1024, dtype=cfg.dtype, vocab_size=vocab)
        step = jax.jit(lambda s, bt, spec=spec: train_step(s, bt, graphdef=graphdef, tx=tx, schedule=sched,
                                                           spec=spec, n_micro=1), donate_argnums=0)
        t0 = time.perf_counter()
        state, met = step(state, batch)
        jax.block_until_ready(met)
        compile_s = time.perf_counter() - t0
        n = 3 if small else 10
        t0 = time.perf_counter()
        for _ in range(n):
            state, met = step(state, batch)
        jax.block_until_ready(met)
        dt = (time.perf_counter() - t0) / n
        tps = b * (p + r) / dt
        fpt = flops_per_token(cfg, p + r)
        dev = jax.devices()[0]
        peak = peak_flops(dev.device_kind)
        rows.append((impl, dt * 1e3, tps, fpt * tps / 1e12, None if peak is None else fpt * tps / peak, compile_s,
                     float(met["loss"])))
    print(f"device: {jax.devices()[0].device_kind}; model {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.0f}M "
          f"params, batch {b} x {p + r} tokens, {cfg.dtype} compute")
    print("| loss impl | step ms | tokens/s | model TFLOP/s | MFU | compile s | loss |")
    print("|---|---|---|---|---|---|---|")
    for impl, ms, tps, tf, m, c, loss in rows:
        print(f"| {impl} | {ms:.1f} | {tps:,.0f} | {tf:.1f} | {'n/a' if m is None else f'{m:.1%}'} | {c:.0f} | {loss:.4f} |")


if __name__ == "__main__":
    main()

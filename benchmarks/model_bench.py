"""Forward+backward tokens/s: gold_jax NNX decoder vs transformers PyTorch (CPU), same weights.

    python benchmarks/model_bench.py            # hidden 256, 4 layers, vocab 8192, batch 8 x 256

Both sides run the same step (next-token cross-entropy, gradients for every
parameter) on the same weights (HF save_pretrained -> hf_io.load_pretrained)
and the same batch. Rounds alternate JAX / torch so a noisy shared machine hits
both sides alike; the ratio of medians is the figure to report. torch is timed
at 1 and 2 threads: on an oversubscribed machine its 2-thread OpenMP barriers
can cost it several times over, and the fair ratio is against its best. The step's
model FLOP/s (gold_jax.models.flops, PaLM convention) is also given as a
fraction of this machine's measured float32 matmul peak (a large jnp.dot).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gold_jax.models import flops_per_token, hf_io


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Best-of FLOP/s of an n x n float32 jnp.dot: the machine's practical matmul peak."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def hf_model(args):
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        max_position_embeddings=max(2048, args.seq), rope_theta=10000.0)
    # sdpa: transformers' fastest CPU attention, so the baseline is not a straw man.
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").train()


def jax_step(model):
    """jit(value_and_grad) of the masked next-token cross-entropy over all parameters."""
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params, ids, mask):
        # Targets and weights shifted instead of slicing the logits: no copy of [B, L, V].
        logits = nnx.merge(graphdef, params)(ids, mask)
        target = jnp.roll(ids, -1, axis=1)
        w = (mask * jnp.roll(mask, -1, axis=1)).at[:, -1].set(0).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.sum(jnp.where(jnp.arange(logits.shape[-1]) == target[..., None], logits, 0.0), -1)
        return jnp.sum((lse - tgt) * w) / jnp.sum(w)

    step = jax.jit(jax.value_and_grad(loss_fn))
    return lambda ids, mask: jax.block_until_ready(step(params, ids, mask))


def torch_step(model):
    import torch

    def step(ids, mask):
        model.zero_grad(set_to_none=True)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # as gold_jax: left padding starts at 0
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1].float()
        w = (mask[:, :-1] * mask[:, 1:]).float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        loss = (nll * w.reshape(-1)).sum() / w.sum()
        loss.backward()
        return loss.item()
    return step


def timed(fn, *a) -> float:
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv_heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--torch_threads", type=int, default=0, help="0: time torch at 1 and 2 threads")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="steps per side per round")
    args = ap.parse_args()
    import torch

    print(f"load {os.getloadavg()[0]:.2f} | jax {jax.__version__} {jax.devices()[0].device_kind} "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} | torch {torch.__version__}")
    hf = hf_model(args)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = hf_io.load_pretrained(d)
    cfg = model.config
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::2, : args.seq // 8] = 0  # left padding on half the rows: the mask path is exercised
    j_ids, j_mask = jnp.asarray(ids), jnp.asarray(mask)
    t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    jstep, tstep = jax_step(model), torch_step(hf)
    jl, tl = float(jstep(j_ids, j_mask)[0]), tstep(t_ids, t_mask)  # compile / warm up
    print(f"loss  jax {jl:.6f}  torch {tl:.6f}  (same weights: these agree)")
    counts = [args.torch_threads] if args.torch_threads else [1, 2]
    jt, tt = [], {n: [] for n in counts}
    for _ in range(args.rounds):  # alternate, so load changes hit every side alike
        jt += [timed(jstep, j_ids, j_mask) for _ in range(args.steps)]
        for n in counts:
            torch.set_num_threads(n)
            tstep(t_ids, t_mask)  # settle the thread pool at this count
            tt[n] += [timed(tstep, t_ids, t_mask) for _ in range(args.steps)]
    tokens = args.batch * args.seq
    j_tps = tokens / statistics.median(jt)
    t_tps = {n: tokens / statistics.median(v) for n, v in tt.items()}
    peak = matmul_peak()
    fpt = flops_per_token(cfg, args.seq)
    print(f"config hidden={cfg.hidden_size} layers={cfg.num_layers} heads={cfg.num_heads}/"
          f"{cfg.num_kv_heads} vocab={cfg.vocab_size} batch={args.batch}x{args.seq} "
          f"({fpt / 1e6:.1f} MFLOP/token fwd+bwd)")
    print(f"matmul peak (float32 jnp.dot 2048^3, best of 10): {peak / 1e9:.1f} GFLOP/s")
    rows = [("gold_jax", j_tps, jt)] + [(f"torch x{n}", t_tps[n], tt[n]) for n in counts]
    for name, tps, ts in rows:
        print(f"{name:9s} {tps:9.0f} tokens/s  step {statistics.median(ts) * 1e3:7.1f} ms  "
              f"{fpt * tps / 1e9:6.1f} GFLOP/s = {fpt * tps / peak:.3f} of matmul peak")
    for n in counts:
        print(f"RATIO gold_jax / torch({n} thread{'s' if n > 1 else ''}) = {j_tps / t_tps[n]:.2f}x")
    best = max(t_tps, key=t_tps.get)
    print(f"RATIO vs torch's best thread count ({best}) = {j_tps / t_tps[best]:.2f}x  (target >= 3x)  "
          f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

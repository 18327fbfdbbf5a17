"""Loss benchmarks: XLA temporary memory (dense vs chunked fused) and fwd+bwd wall-time ratios.

    python benchmarks/loss_bench.py                 # both tables
    python benchmarks/loss_bench.py --skip-time     # memory only (compile only, any machine)

(a) Peak temporary memory of forward + backward (grads w.r.t. hidden and
lm_head) from XLA's compiled memory analysis, compile only, at tokens=8192,
vocab=151936, hidden=2048: the loss on materialised logits vs `fused_jsd`.
(b) Wall time of forward + backward (grad w.r.t. the logits) of the dense,
top-k and vocab-parallel losses on 8 fake CPU devices at a CPU-sized shape,
as ratios to the dense loss measured in the same run. A benchmark: never a test.
"""
from __future__ import annotations

import argparse
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gold_jax.losses import (fused_jsd, generalized_jsd, topk_jsd, vocab_parallel_jsd,  # noqa: E402
                             vocab_parallel_topk_jsd)
from gold_jax.sharding import make_mesh  # noqa: E402

KW = dict(beta=0.5, temperature=0.9)


def memory_table(tokens: int, vocab: int, hidden: int, k: int, chunks: list[int]) -> None:
    sds = jax.ShapeDtypeStruct
    h, w = sds((tokens, hidden), jnp.float32), sds((hidden, vocab), jnp.float32)
    lt, ids, mask = sds((tokens, k), jnp.float32), sds((tokens, k), jnp.int32), sds((tokens,), jnp.float32)
    t_logits = sds((tokens, vocab), jnp.float32)

    def temp_bytes(loss, *args):
        grad = jax.grad(loss, argnums=(0, 1))
        return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes

    rows = []
    for mode in ("tail", "dense"):
        if mode == "dense":
            ref = temp_bytes(lambda a, b, t, m: generalized_jsd(a @ b, t, m, **KW), h, w, t_logits, mask)
        else:
            ref = temp_bytes(lambda a, b, x, i, m: topk_jsd(a @ b, x, i, m, **KW), h, w, lt, ids, mask)
        rows.append((f"materialised logits, teacher {mode}", ref, 1.0))
        for c in chunks:
            if mode == "dense":
                b = temp_bytes(lambda a, b, t, m: fused_jsd(a, b, None, None, m, mode="dense", teacher_logits=t,
                                                            chunk_size=c, **KW), h, w, t_logits, mask)
            else:
                b = temp_bytes(lambda a, b, x, i, m: fused_jsd(a, b, x, i, m, mode="tail", chunk_size=c, **KW),
                               h, w, lt, ids, mask)
            rows.append((f"fused chunk_size={c}, teacher {mode}", b, b / ref))
    print(f"\n(a) XLA temp memory, fwd+bwd, tokens={tokens} vocab={vocab} hidden={hidden} k={k} (float32)")
    print(f"{'variant':<40} {'temp GiB':>9} {'vs materialised':>16}")
    for name, b, r in rows:
        print(f"{name:<40} {b / 2**30:>9.2f} {r:>15.3f}x")


def time_table(tokens: int, vocab: int, k: int, reps: int) -> None:
    r = np.random.default_rng(0)
    s = jnp.asarray((r.normal(size=(tokens, vocab)) * 2).astype(np.float32))
    t = jnp.asarray((r.normal(size=(tokens, vocab)) * 2).astype(np.float32))
    mask = jnp.asarray((r.random(tokens) < 0.9).astype(np.float32))
    lt, ids = jax.lax.top_k(jax.nn.log_softmax(t / KW["temperature"]), k)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
    args = (s, t, lt, ids, mask)  # arguments, not closure constants (XLA would constant-fold the top-k scatter)
    variants = {
        "dense (generalized_jsd)": lambda x, t, lt, ids, m: generalized_jsd(x, t, m, **KW),
        f"top-k tail k={k} (topk_jsd)": lambda x, t, lt, ids, m: topk_jsd(x, lt, ids, m, **KW),
        f"top-k renormalize k={k}": lambda x, t, lt, ids, m: topk_jsd(x, lt, ids, m, mode="renormalize", **KW),
        "vocab-parallel dense, 8 shards": lambda x, t, lt, ids, m: vocab_parallel_jsd(x, t, m, mesh=mesh, **KW),
        "vocab-parallel top-k tail, 8 shards":
            lambda x, t, lt, ids, m: vocab_parallel_topk_jsd(x, lt, ids, m, mesh=mesh, **KW),
    }
    steps = {name: jax.jit(jax.value_and_grad(f)) for name, f in variants.items()}
    for step in steps.values():
        jax.block_until_ready(step(*args))  # compile + warm-up
    times = {name: [] for name in steps}
    for _ in range(reps):  # round-robin, so that a burst of machine load hits every variant alike
        for name, step in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(step(*args))
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med["dense (generalized_jsd)"]
    print(f"\n(b) fwd+bwd wall time, tokens={tokens} vocab={vocab}, {len(jax.devices())} CPU devices, "
          f"median of {reps} round-robin runs; load average {os.getloadavg()}")
    print(f"{'variant':<40} {'ms':>9} {'vs dense':>9}")
    for name, sec in med.items():
        print(f"{name:<40} {sec * 1e3:>9.1f} {sec / base:>8.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-time", action="store_true")
    ap.add_argument("--chunks", type=int, nargs="+", default=[1024, 512, 256])
    ap.add_argument("--time-tokens", type=int, default=512)
    ap.add_argument("--time-vocab", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    print(f"jax {jax.__version__}, {len(jax.devices())} x {jax.devices()[0].platform}, load average {os.getloadavg()}")
    if not args.skip_memory:
        memory_table(8192, 151936, 2048, 64, args.chunks)
    if not args.skip_time:
        time_table(args.time_tokens, args.time_vocab, 64, args.reps)


if __name__ == "__main__":
    main()

"""Hidden-state teacher: compiled memory of the loss, wire bytes and round trips, colocated vs server step.

    python benchmarks/hidden_teacher_bench.py                # all tables
    python benchmarks/hidden_teacher_bench.py --only memory  # (a) only: compile only, any machine

(a) XLA temporary memory of the colocated loss, forward + backward (grads
w.r.t. the student's hidden states and lm head), compile only
(`jax.jit(...).lower(ShapeDtypeStruct...).compile().memory_analysis()`), at
tokens=8192, vocab=151936, hidden=2048 for both models (teacher hidden states
and head in bfloat16, as on an accelerator): fused_jsd mode "hidden" vs
materialising both logits and taking the dense JSD.
(b) Wire bytes per scored token and server round-trip time for the teacher
signals hidden / top-k 64 / full rows, on teacher_bench.py's model (8 layers,
hidden 512, vocab 32000), one embedded server, medians of alternating calls.
(c) One GOLD step (tiny demo-sized models from the test config) with the
teacher colocated in the step vs today's embedded server teacher (top-k),
steps/s measured side by side in one run.
A benchmark: never a test.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gold_jax.losses import generalized_jsd  # noqa: E402
from gold_jax.losses.fused import fused_hidden_jsd  # noqa: E402

KW = dict(beta=0.5, temperature=0.9)


def temp_bytes(loss, *args) -> tuple[int, int]:
    """(temp bytes, argument bytes) of jit(grad(loss) w.r.t. args 0 and 1), compile only."""
    m = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().memory_analysis()
    return m.temp_size_in_bytes, m.argument_size_in_bytes


def memory_table(tokens: int, vocab: int, hidden: int, chunks: list[int]) -> None:
    sds = jax.ShapeDtypeStruct
    h, w = sds((tokens, hidden), jnp.float32), sds((hidden, vocab), jnp.float32)
    mask = sds((tokens,), jnp.float32)

    def teacher(dtype):
        return sds((tokens, hidden), dtype), sds((hidden, vocab), dtype)

    def materialised(a, b, c, d, m):
        s = jnp.dot(a, b, preferred_element_type=jnp.float32)
        t = jnp.dot(c, d, preferred_element_type=jnp.float32)
        return generalized_jsd(s, t, m, **KW)

    def fused(c):
        return lambda a, b, c_, d, m: fused_hidden_jsd(a, b, c_, d, m, chunk_size=c, **KW)

    ref, ref_args = temp_bytes(materialised, h, w, *teacher(jnp.float32), mask)
    rows = [("materialise both logits + dense JSD", ref, ref_args, 1.0)]
    for c in chunks:
        b, args = temp_bytes(fused(c), h, w, *teacher(jnp.float32), mask)
        rows.append((f"fused_jsd mode=hidden chunk_size={c}", b, args, b / ref))
    b, args = temp_bytes(fused(chunks[0]), h, w, *teacher(jnp.bfloat16), mask)
    rows.append((f"  same, chunk {chunks[0]}, teacher bfloat16 (*)", b, args, b / ref))
    print(f"\n(a) XLA temp memory of the loss, fwd+bwd, tokens={tokens} vocab={vocab} hidden={hidden} "
          "(student and teacher float32 unless said)")
    print(f"{'variant':<44} {'temp GiB':>9} {'args GiB':>9} {'temp vs materialised':>21}")
    for name, b, args, r in rows:
        print(f"{name:<44} {b / 2**30:>9.3f} {args / 2**30:>9.3f} {r:>20.4f}x")
    print(f"one [tokens, vocab] float32 logits array: {tokens * vocab * 4 / 2**30:.3f} GiB")
    print("(*) XLA:CPU has no bfloat16 dot: it converts the whole teacher head to float32 once, hoisted out of the\n"
          "    chunk loop ([hidden, vocab] float32 of temp); GPU/TPU multiply bfloat16 natively. teacher.dtype=auto\n"
          "    is float32 on CPU for this reason among others.")


def wire_table(batch: int, length: int, prompt: int, k: int, reps: int) -> None:
    """Reply bytes per scored token and client round trips over tcp://127.0.0.1 to one embedded server."""
    import statistics
    import sys
    import time

    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from teacher_bench import make_backend

    from gold_jax.teacher import TeacherClient, start_local_teacher
    from gold_jax.teacher import protocol as P
    from gold_jax.types import SequenceBatch
    backend = make_backend(length)
    vocab, hidden = backend.info()["vocab_size"], backend.info()["hidden_size"]
    rng = np.random.default_rng(0)
    seq = SequenceBatch(rng.integers(0, vocab, (batch, prompt), dtype=np.int32), np.ones((batch, prompt), np.int32),
                        rng.integers(0, vocab, (batch, length - prompt), dtype=np.int32),
                        np.ones((batch, length - prompt), np.int32))
    scored = batch * (length - prompt)
    with start_local_teacher(None, backend=backend, inproc=False) as t, \
            TeacherClient(t.address, timeout_s=600.0, max_retries=0) as c:
        calls = {f"topk-{k}": lambda: c.score(seq, top_k=k, temperature=1.0).result(),
                 "full rows": lambda: c.score(seq, top_k=0, temperature=1.0).result(),
                 "hidden (bf16)": lambda: c.score(seq, top_k=0, temperature=1.0, signal="hidden").result()}
        size = {}
        for name, fn in calls.items():   # warm-up (compiles) and the reply size
            rep = P.encode_reply("x" * 32, arrays=P.scores_to_arrays(fn()))
            size[name] = sum(len(memoryview(f)) for f in rep[1:]) / scored
        times = {name: [] for name in calls}
        order = list(calls)
        for i in range(reps):   # rotating order: a drifting machine load hits every signal alike
            for name in order[i % 3:] + order[:i % 3]:
                t0 = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        c.head()
        head_s = time.perf_counter() - t0
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"\n(b) teacher server (embedded, tcp), model 8x512 vocab {vocab} hidden {hidden}, batch {batch} x {length} "
          f"(scored {length - prompt} a row), median of {reps}")
    print(f"{'signal':<16} {'reply bytes/token':>18} {'vs hidden':>10} {'round trip ms':>14} {'vs topk':>8}")
    ref = med[f"topk-{k}"]
    for name in calls:
        print(f"{name:<16} {size[name]:>18.0f} {size[name] / size['hidden (bf16)']:>9.1f}x {med[name] * 1e3:>14.1f} "
              f"{med[name] / ref:>7.2f}x")
    print(f"hidden also needs the head once: {hidden * backend.info()['embedding_size'] * 4 / 2**20:.1f} MiB float32, "
          f"fetched in {head_s:.2f}s (or read from the teacher's folder)")


def step_table(steps: int, warmup: int, batch: int, lmbdas: list[float]) -> None:
    """The GOLD step on the demo models: colocated teacher vs the embedded server teacher (top-k 64)."""
    import sys
    import types

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import train_bench
    base = train_bench.gold_config
    rows = []
    for lmbda in lmbdas:
        for mode in ("server", "colocated"):
            def cfg_fn(*a, mode=mode):
                c = base(*a)
                c.teacher.mode = mode
                return c
            train_bench.gold_config = cfg_fn
            args = types.SimpleNamespace(seed=0, cache_dir="~/.cache/gold_jax/demo", batch=batch, warmup=warmup,
                                         steps=steps)
            r = train_bench.run_gold(args, lmbda, "one_step_off")
            rows.append((lmbda, mode, r))
    train_bench.gold_config = base
    print(f"\n(c) GOLD step on the demo models (one_step_off, batch {batch}, {steps} timed steps after {warmup}), "
          "teacher colocated in the step vs the embedded teacher server (top-k 64). TRL is not installed here: "
          "gold_jax against itself.")
    print(f"{'lmbda':>5} {'teacher':<10} {'tokens/s':>9} {'step s':>7} {'teacher s':>9} {'update s':>9} "
          f"{'vs server':>9} {'load':>5}")
    for lmbda, mode, r in rows:
        srv = next(x for lm, m, x in rows if lm == lmbda and m == "server")
        print(f"{lmbda:>5g} {mode:<10} {r['tokens_per_s']:>9.0f} {r['step_s_median']:>7.3f} {r['teacher_s']:>9.3f} "
              f"{r['update_s']:>9.3f} {r['tokens_per_s'] / srv['tokens_per_s']:>8.2f}x {r['load']:>5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("memory", "wire", "step"), default=None)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    print(f"devices: {jax.devices()[0].device_kind} x{jax.device_count()}")
    if args.only in (None, "memory"):
        memory_table(args.tokens, args.vocab, args.hidden, [256, 512, 1024])
    if args.only in (None, "wire"):
        wire_table(2, 512, 256, 64, args.reps)
    if args.only in (None, "step"):
        step_table(args.steps, args.warmup, 16, [0.0, 1.0])


if __name__ == "__main__":
    main()

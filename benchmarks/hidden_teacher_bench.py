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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("memory", "wire", "step"), default=None)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=2048)
    args = ap.parse_args()
    print(f"devices: {jax.devices()[0].device_kind} x{jax.device_count()}")
    if args.only in (None, "memory"):
        memory_table(args.tokens, args.vocab, args.hidden, [256, 512, 1024])


if __name__ == "__main__":
    main()

r"""LoRA vs full training: optimizer-state and gradient bytes, compiled step memory, step time.

    gtest .venv/bin/python benchmarks/lora_bench.py            # model-bench size + 0.5B-shaped (compile only)
    gtest .venv/bin/python benchmarks/lora_bench.py --skip_05b --steps 5

Both use gold_jax.train_step.train_step (AdamW, clipping, the frozen base as a
separate argument for LoRA) with a next-token cross-entropy as the loss (the
distillation loss is the same for both; what differs is what is trained).
The 0.5B-shaped student (Qwen2.5-0.5B's config) is never materialised: its
state is abstract (nnx.eval_shape) and the step is only compiled, for XLA's
memory analysis. Step time is measured at the model-bench size, full and LoRA
rounds alternating in one run.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gold_jax.losses.registry import LossSpec
from gold_jax.models import ModelConfig, init_model
from gold_jax.models import lora
from gold_jax.train_step import TrainState, train_step

BENCH = ModelConfig(architecture="llama", vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=2048)
QWEN05 = ModelConfig(architecture="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                     num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, attention_bias=True,
                     tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768)


def ce_loss(model, batch, spec, mesh):
    """Sum of next-token cross-entropy over completion_mask (train_step divides by the token count)."""
    logits = model(batch["input_ids"], batch["attention_mask"])[:, :-1]
    lp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(lp, batch["input_ids"][:, 1:, None], -1)[..., 0]
    return (nll * batch["completion_mask"]).sum()


def nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def build(cfg: ModelConfig, rank: int, abstract: bool):
    """(graphdef, trainable, frozen or None), concrete or abstract."""
    def make():
        m = init_model(cfg)
        if rank == 0:
            g, p = nnx.split(m)
            return g, p, None
        st = lora.LoraStudent(m, lora.LoraSpec(rank, 2.0 * rank, 0.0, ("q", "k", "v", "o", "gate", "up", "down")))
        return st.graphdef, st.adapters, st.frozen
    if not abstract:
        return make()
    out = {}
    def shapes():
        g, p, f = make()
        out["g"] = g
        return p, f
    p, f = jax.eval_shape(shapes)
    return out["g"], p, f


def step_fn(graphdef, tx, has_frozen: bool):
    spec = LossSpec(impl="dense", dtype="float32")
    kw = dict(graphdef=graphdef, tx=tx, schedule=lambda s: 1e-3, spec=spec, n_micro=1, loss_fn=ce_loss)
    if has_frozen:
        return jax.jit(lambda s, b, f: train_step(s, b, frozen=f, **kw), donate_argnums=(0,))
    return jax.jit(lambda s, b: train_step(s, b, **kw), donate_argnums=(0,))


def measure(cfg: ModelConfig, rank: int, batch: int, seq: int, abstract: bool, steps: int):
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    graphdef, params, frozen = build(cfg, rank, abstract)
    opt = jax.eval_shape(tx.init, params)
    state = TrainState(params, opt, jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
    b = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32) for k in ("input_ids", "attention_mask")}
    b["completion_mask"] = jax.ShapeDtypeStruct((batch, seq - 1), jnp.int32)
    fn = step_fn(graphdef, tx, frozen is not None)
    args = (state, b) if frozen is None else (state, b, frozen)
    t0 = time.perf_counter()
    mem = fn.lower(*args).compile().memory_analysis()
    row = dict(trainable=nbytes(params), opt=nbytes(opt), frozen=nbytes(frozen) if frozen is not None else 0,
               temp=getattr(mem, "temp_size_in_bytes", -1), args=getattr(mem, "argument_size_in_bytes", -1),
               compile_s=time.perf_counter() - t0)
    if abstract or steps == 0:
        return row, None
    # Concrete state and batch for timing.
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
    real = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "completion_mask": jnp.ones((batch, seq - 1),
                                                                                                   jnp.int32)}
    s = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    run = (lambda s: fn(s, real)) if frozen is None else (lambda s: fn(s, real, frozen))
    s, m = run(s)
    jax.block_until_ready(m)
    return row, (run, s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round (model-bench size)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip_05b", action="store_true")
    a = ap.parse_args()
    mib = lambda x: f"{x / 2**20:9.2f}"  # noqa: E731
    print(f"LoRA rank {a.rank} (targets q,k,v,o,gate,up,down) vs full; AdamW; float32 master weights")
    cases = [("model-bench", BENCH, a.batch, a.seq, False)]
    if not a.skip_05b:
        cases.append(("qwen2.5-0.5B-shaped", QWEN05, 1, 256, True))
    timers = {}
    for name, cfg, batch, seq, abstract in cases:
        print(f"\n{name}: hidden {cfg.hidden_size}, {cfg.num_layers} layers, vocab {cfg.vocab_size}, "
              f"batch {batch}x{seq}{' (compile only)' if abstract else ''}")
        print(f"{'':8s} {'trainable=grad MiB':>19s} {'opt state MiB':>14s} {'frozen MiB':>11s} "
              f"{'step temp MiB':>14s} {'step args MiB':>14s}")
        rows = {}
        for label, rank in (("full", 0), (f"lora{a.rank}", a.rank)):
            row, timer = measure(cfg, rank, batch, seq, abstract, a.steps)
            rows[label] = row
            if timer:
                timers[label] = timer
            print(f"{label:8s} {mib(row['trainable']):>19s} {mib(row['opt']):>14s} {mib(row['frozen']):>11s} "
                  f"{mib(row['temp']):>14s} {mib(row['args']):>14s}")
        f, l = rows["full"], rows[f"lora{a.rank}"]
        print(f"ratio lora/full: grads {l['trainable'] / f['trainable']:.4f}, optimizer state "
              f"{l['opt'] / f['opt']:.4f}, step temp {l['temp'] / max(f['temp'], 1):.3f}")
    if timers:
        best = {k: float("inf") for k in timers}
        for _ in range(a.rounds):   # alternate full / LoRA so machine noise hits both
            for k, (run, s) in list(timers.items()):
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    s, m = run(s)
                jax.block_until_ready(m)
                best[k] = min(best[k], (time.perf_counter() - t0) / a.steps)
                timers[k] = (run, s)
        print(f"\nstep time (model-bench size, best of {a.rounds} rounds of {a.steps}): " +
              ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in best.items()) +
              f"; lora/full {best[f'lora{a.rank}'] / best['full']:.3f}")


if __name__ == "__main__":
    main()

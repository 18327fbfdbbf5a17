r"""Compiled memory plans: the real GOLD train step, AOT-compiled for real model sizes on fake devices.

Nothing is allocated: the student is built with `nnx.eval_shape`, the train state
and the batch are `jax.ShapeDtypeStruct`s carrying their shardings, and
`jax.jit(step).lower(...).compile()` runs XLA's SPMD partitioner for the mesh.
XLA's memory analysis then gives the per-device bytes of one step, and the
compiled HLO the collectives it issues.

The step is the trainer's (`gold_jax.train_step.jit_train_step`): float32
master weights and AdamW state, bf16 compute, the fused top-k loss
(`loss.impl="fused"`, the lm-head chunked so [tokens, vocab] logits never
exist), per-layer remat (`ModelConfig.remat`), 1024-token rows
(prompt 512 + completion 512), one row per batch shard (data x fsdp).

    XLA_FLAGS=--xla_force_host_platform_device_count=256 JAX_PLATFORMS=cpu \
        gtest python benchmarks/scale_plan.py --jsonl runs/scale_plan.jsonl
    # one model, one mesh:  --models qwen2.5-0.5b --meshes 1x8x1
    # the step without activation constraints (sharding/activations.py), for comparison: --no-constraints
    # the table of rows already written:  --table runs/scale_plan.jsonl

Each plan is appended to --jsonl as soon as it compiles, so a cut-off run keeps its rows.

Caveat: the compile targets XLA:CPU, whose buffer assignment is close to, but
not the same as, XLA:GPU's or XLA:TPU's (CPU may also keep some bf16 ops in
float32). Treat the figures as a plan to check on the first real step, not as
a guarantee; the HBM capacities below leave no room for the runtime itself.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=256").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from gold_jax.models import ModelConfig  # noqa: E402
from gold_jax.models.decoder import Decoder  # noqa: E402
from gold_jax.models.partition import state_shardings  # noqa: E402
from gold_jax.sharding import LOGICAL_AXIS_RULES, make_mesh  # noqa: E402
from gold_jax.sharding.activations import activation_rules  # noqa: E402
from gold_jax.sharding.replication_check import replication_report  # noqa: E402
from gold_jax.train_step import LossSpec, TrainState, batch_sharding, jit_train_step, make_optimizer  # noqa: E402

# Real configs (config.json of each HF repo), written inline: no weights, no download.
MODELS: dict[str, ModelConfig] = {
    "qwen2.5-0.5b": ModelConfig(architecture="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1e6,
                                tie_word_embeddings=True, attention_bias=True, max_position_embeddings=32768),
    "qwen2.5-1.5b": ModelConfig(architecture="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=1e6,
                                tie_word_embeddings=True, attention_bias=True, max_position_embeddings=32768),
    "qwen2.5-7b": ModelConfig(architecture="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                              num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1e6,
                              tie_word_embeddings=False, attention_bias=True, max_position_embeddings=32768),
    "qwen3-8b": ModelConfig(architecture="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                            num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6,
                            tie_word_embeddings=False, qk_norm=True, max_position_embeddings=40960),
}

# Per-chip HBM, bytes (datasheet figures).
CHIPS = {"H100 80G": 80 * 2**30, "H200 141G": 141 * 10**9, "v5e 16G": 16 * 2**30, "v5p 95G": 95 * 2**30}

# (data, fsdp, tensor) per device count: the default plan and what the README recommends from.
DEFAULT_MESHES = {8: [(1, 8, 1), (1, 4, 2), (8, 1, 1)], 64: [(8, 8, 1), (1, 64, 1), (4, 8, 2)],
                  256: [(32, 8, 1), (1, 256, 1), (16, 8, 2)]}

PROMPT, COMPLETION, TOP_K = 512, 512, 64
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8}


@dataclasses.dataclass
class Plan:
    model: str
    mesh: tuple[int, int, int]
    params: int                   # parameter count
    argument: int                 # per-device bytes, XLA memory analysis
    output: int
    temp: int
    alias: int
    total: int                    # argument + output + temp - alias (donated state is reused for the output)
    replicated: float             # share of parameter bytes replicated on every device
    collectives: dict[str, tuple[int, int]]   # op -> (count in the HLO, bytes of their results per device)
    compile_s: float
    constraints: bool = True      # activation sharding constraints on (sharding/activations.py)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, line: str) -> "Plan":
        d = json.loads(line)
        d["mesh"] = tuple(d["mesh"])
        d["collectives"] = {k: tuple(v) for k, v in d["collectives"].items()}
        return cls(**d)


def opt_config(**kw: Any) -> ml_collections.ConfigDict:
    base = dict(lr=1e-5, schedule="cosine", warmup_steps=0, min_lr_ratio=0.0, weight_decay=0.0, b1=0.9, b2=0.999,
                eps=1e-8, max_grad_norm=1.0)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def abstract_state(cfg: ModelConfig, mesh: Any, tx: optax.GradientTransformation, rules=LOGICAL_AXIS_RULES):
    """(graphdef, TrainState of ShapeDtypeStructs with shardings): the trainer's state, never allocated."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    shard = state_shardings(params, mesh, rules)
    sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    params = jax.tree.map(sds, params, shard)
    rep = NamedSharding(mesh, P())
    opt = jax.eval_shape(tx.init, params)
    # AdamW's mu/nu live with their parameter (optax.tree_map_params); counts are replicated scalars.
    opt = optax.tree_map_params(tx, lambda x, s: sds(x, s), opt, shard,
                                transform_non_params=lambda x: sds(x, rep))
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    return graphdef, TrainState(params, opt, scalar, scalar)


def abstract_batch(mesh: Any, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    sh = batch_sharding(mesh)
    length = PROMPT + COMPLETION
    f = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)  # noqa: E731
    return {"input_ids": f((rows, length), jnp.int32), "attention_mask": f((rows, length), jnp.int32),
            "completion_mask": f((rows, COMPLETION), jnp.int32),
            "teacher_logprobs": f((rows, COMPLETION, TOP_K), jnp.float32),
            "teacher_ids": f((rows, COMPLETION, TOP_K), jnp.int32),
            "teacher_logmass": f((rows, COMPLETION), jnp.float32)}


def count_collectives(hlo: str) -> dict[str, tuple[int, int]]:
    """Collective ops in compiled HLO text: count and bytes of their results (one device's view).

    Static count: an op inside a loop body (e.g. the fused loss's chunk loop) is counted once.
    """
    out = {k: [0, 0] for k in COLLECTIVES}
    pat = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
    for line in hlo.splitlines():
        m = pat.search(line)
        if not m:
            continue
        nbytes = 0
        for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1)):
            if dt in _DTYPE_BYTES:
                nbytes += _DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
        out[m.group(2)][0] += 1
        out[m.group(2)][1] += nbytes
    return {k: (c, b) for k, (c, b) in out.items()}


def plan(name: str, mesh_shape: tuple[int, int, int], *, remat: str = "full", chunk_size: int = 512,
         rules=LOGICAL_AXIS_RULES, devices: list | None = None, constraints: bool = True) -> Plan:
    cfg = MODELS[name].replace(dtype="bfloat16", param_dtype="float32", remat=remat)
    n = math.prod(mesh_shape)
    devices = devices if devices is not None else jax.devices()[:n]
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)), devices=devices)
    tx, schedule = make_optimizer(opt_config(), 1000)
    graphdef, state = abstract_state(cfg, mesh, tx, rules)
    spec = LossSpec(impl="fused", beta=0.5, temperature=0.9, mode="tail", chunk_size=chunk_size, dtype="bfloat16",
                    vocab_size=cfg.vocab_size)
    step = jit_train_step(state, mesh=mesh, graphdef=graphdef, tx=tx, schedule=schedule, spec=spec, n_micro=1)
    batch = abstract_batch(mesh, rows=mesh_shape[0] * mesh_shape[1])
    t0 = time.perf_counter()
    with activation_rules(rules, enabled=constraints):   # read while tracing, i.e. in lower()
        lowered = step.lower(state, batch)
    compiled = lowered.compile()
    secs = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    arg, out, tmp, alias = (int(getattr(ma, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias"))
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    return Plan(name, mesh_shape, n_params, arg, out, tmp, alias, arg + out + tmp - alias,
                replication_report(state.params).fraction, count_collectives(compiled.as_text()), secs, constraints)


def _gib(b: int) -> str:
    return f"{b / 2**30:.2f}"


def table(plans: list[Plan]) -> str:
    chips = " | ".join(CHIPS)
    head = (f"| model | params | mesh (data,fsdp,tensor) | act. constraints | argument GiB | output GiB | temp GiB | "
            f"total GiB | {chips} | replicated | all-gather n / GiB | reduce-scatter n / GiB | all-reduce n / GiB | "
            "all-to-all + permute n / GiB | compile s |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in plans:
        fits = " | ".join("yes" if p.total <= cap else "no" for cap in CHIPS.values())
        col = lambda k: f"{p.collectives[k][0]} / {p.collectives[k][1] / 2**30:.2f}"  # noqa: E731
        other = [p.collectives.get(k, (0, 0)) for k in ("all-to-all", "collective-permute")]
        rows.append(f"| {p.model} | {p.params / 1e9:.2f}B | {'x'.join(map(str, p.mesh))} | "
                    f"{'on' if p.constraints else 'off'} | {_gib(p.argument)} | "
                    f"{_gib(p.output)} | {_gib(p.temp)} | {_gib(p.total)} | {fits} | {p.replicated:.2%} | "
                    f"{col('all-gather')} | {col('reduce-scatter')} | {col('all-reduce')} | "
                    f"{sum(c for c, _ in other)} / {sum(b for _, b in other) / 2**30:.2f} | {p.compile_s:.0f} |")
    return "\n".join(rows)


def recommend(plans: list[Plan], cap: int = CHIPS["H100 80G"]) -> list[str]:
    """Per model and device count: the fitting mesh with the least collective bytes (then least memory)."""
    out = []
    plans = [p for p in plans if p.constraints]
    for name in dict.fromkeys(p.model for p in plans):
        for n in sorted({math.prod(p.mesh) for p in plans if p.model == name}):
            cands = [p for p in plans if p.model == name and math.prod(p.mesh) == n and p.total <= cap]
            if not cands:
                out.append(f"- {name} on {n} x 80 GB: nothing in this plan fits")
                continue
            best = min(cands, key=lambda p: (sum(b for _, b in p.collectives.values()), p.total))
            out.append(f"- {name} on {n} x 80 GB: mesh {'x'.join(map(str, best.mesh))} "
                       f"({_gib(best.total)} GiB per device)")
    return out


def _mesh_arg(s: str) -> tuple[int, int, int]:
    parts = tuple(int(x) for x in s.lower().split("x"))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"mesh {s!r}: expected DATAxFSDPxTENSOR, e.g. 1x8x1")
    return parts  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--meshes", nargs="+", type=_mesh_arg, default=None,
                    help="DATAxFSDPxTENSOR meshes (default: a few per 8, 64 and 256 devices)")
    ap.add_argument("--remat", default="full", choices=("none", "full", "dots"))
    ap.add_argument("--no-constraints", action="store_true",
                    help="compile without the decoder's activation sharding constraints (the earlier plan)")
    ap.add_argument("--jsonl", default="", help="append each plan here as one JSON line as soon as it compiles")
    ap.add_argument("--table", nargs="+", default=None, metavar="JSONL",
                    help="compile nothing: print the table and recommendations of plans in these JSONL files")
    ap.add_argument("--out", default="", help="also write the markdown table here")
    args = ap.parse_args(argv)
    if args.table:
        plans = []
        for path in args.table:
            with open(path) as f:
                plans += [Plan.from_json(line) for line in f if line.strip()]
        print(table(plans))
        print("\n".join(recommend(plans)))
        return 0
    meshes = args.meshes or [m for ms in DEFAULT_MESHES.values() for m in ms]
    need = max(math.prod(m) for m in meshes)
    if len(jax.devices()) < need:
        print(f"error: {need} devices needed, {len(jax.devices())} present: run with "
              f"XLA_FLAGS=--xla_force_host_platform_device_count={need}", file=sys.stderr)
        return 2
    plans = []
    for name in args.models:
        for m in meshes:
            p = plan(name, m, remat=args.remat, constraints=not args.no_constraints)
            plans.append(p)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(p.to_json() + "\n")
            print(f"{name} {m}: total {_gib(p.total)} GiB/device (arg {_gib(p.argument)}, temp {_gib(p.temp)}), "
                  f"compiled in {p.compile_s:.0f}s", flush=True)
    text = table(plans)
    rec = recommend(plans)
    print(text)
    print("\n".join(rec))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("# Compiled memory plans (benchmarks/scale_plan.py)\n\n")
            f.write(f"Per device, from XLA's memory analysis of the AOT-compiled train step (XLA:CPU, fake devices): "
                    f"float32 master weights + AdamW, bf16 compute, fused top-k loss (k={TOP_K}), remat={args.remat}, "
                    f"rows of {PROMPT}+{COMPLETION} tokens, one row per batch shard (data x fsdp). total = argument + "
                    "output + temp - aliased (the donated state). Collectives: static count in the compiled HLO and "
                    "bytes of their results on one device.\n\n")
            f.write(text + "\n\nRecommended (least collective traffic among the meshes that fit 80 GB):\n\n")
            f.write("\n".join(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

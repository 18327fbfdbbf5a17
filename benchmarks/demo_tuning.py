"""Tuning the README demo (issue 18): which settings close most of the teacher-student gap.

Each run is configs/gold.py (the demo) plus overrides, trained in this process;
its record (accuracy at every evaluation, the fraction of the gap closed,
training seconds, CPU seconds, load average) is appended to
benchmarks/results/demo_tuning_runs.jsonl as soon as it finishes, so a cut-off
sweep still yields figures. The CPU is shared: `train_s` (the sum of the
per-step `timing/step`) is wall time under the load of the moment and
`load_avg` says how loaded it was; `train_cpu_s` (the process's CPU seconds
inside the training steps, all threads) does not depend on the load: on an
idle 2-core machine the demo's "5 minutes of training" is at most 600 of them.
`cpu_s` is the process's CPU time from the trainer's start to its end
(evaluations included).

    python benchmarks/demo_tuning.py run --name lr1e-3 --steps 200 --set optimizer.lr=1e-3 \
        --set trainer.global_batch_size=32 [--seeds 0 1]
    python benchmarks/demo_tuning.py ceiling --steps 3000     # the student's SFT ceiling
    python benchmarks/demo_tuning.py table                    # the runs as a markdown table

`ceiling` trains the warmed-up student by supervised fine-tuning on the
train split's correct answers (what the 0.99 teacher writes, token for token
on all but ~1% of prompts) and evaluates it every `--every` steps: the
accuracy the student's size can reach with far more than the demo's budget.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sys
import time

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/gold_jax_demo_tuning_jit_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RUNS = os.path.join(RESULTS, "demo_tuning_runs.jsonl")


from distill_study import _gold_config, quiet_run  # noqa: E402  (this script's folder is sys.path[0])


def _parse(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _append(rec: dict) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(RUNS, "a") as f:
        f.write(json.dumps(rec) + "\n")


def run_one(name: str, steps: int, sets: dict, seed: int, eval_every: int, run_root: str) -> dict:
    import numpy as np

    from gold_jax.metrics import read_jsonl
    from gold_jax.trainer import Trainer
    c = _gold_config()
    c.seed = seed
    c.run_dir = os.path.join(run_root, f"{name}_s{seed}")
    c.trainer.max_steps = steps
    c.trainer.eval_every = eval_every
    quiet_run(c)
    c.update_from_flattened_dict(sets)
    shutil.rmtree(c.run_dir, ignore_errors=True)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    trainer = Trainer(c)
    cpu0, step_cpu = time.process_time(), []
    train_one = trainer.train_one

    def timed_train_one():   # CPU seconds of each update (all threads: sampler, embedded teacher, step)
        t = time.process_time()
        out = train_one()
        step_cpu.append(time.process_time() - t)
        return out
    trainer.train_one = timed_train_one
    trainer.run()
    cpu_s = time.process_time() - cpu0
    wall = time.perf_counter() - t0
    path = os.path.join(c.run_dir, "metrics.jsonl")
    evals = [r for r in read_jsonl(path, kind="eval") if "eval/accuracy" in r]
    train = read_jsonl(path, kind="train")
    from gold_jax.demo.build import ensure_demo_assets
    teacher = ensure_demo_assets(os.path.expanduser(c.demo.cache_dir), preset=c.demo.preset,
                                 progress=False).info["teacher"]["accuracy"]
    acc0, acc = float(evals[0]["eval/accuracy"]), float(evals[-1]["eval/accuracy"])
    return {"name": name, "seed": seed, "steps": len(train), "sets": sets,
            "batch": c.trainer.global_batch_size, "lr": c.optimizer.lr,
            "acc0": acc0, "acc": acc, "teacher": teacher,
            "gap_closed": (acc - acc0) / max(teacher - acc0, 1e-9),
            "curve": [[int(r["step"]), round(float(r["eval/accuracy"]), 4)] for r in evals],
            "on_policy_ratio": float(train[-1]["gold/on_policy_ratio"]) if train else float("nan"),
            "train_s": round(sum(r["timing/step"] for r in train), 1), "cpu_s": round(cpu_s, 1),
            "train_cpu_s": round(sum(step_cpu), 1),
            "step_s_median": round(float(np.median([r["timing/step"] for r in train])), 4),
            "wall_s": round(wall, 1), "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def ceiling(args) -> None:
    import pyarrow.parquet as pq
    from gold_jax.data import load_tokenizer
    from gold_jax.demo import build
    from gold_jax.demo.evaluate import evaluate_accuracy
    from gold_jax.demo.sft import encode_rows, sft_train
    from gold_jax.models import init_model
    from gold_jax.models.hf_io import load_pretrained
    assets = build.ensure_demo_assets(os.path.expanduser(args.cache_dir), preset=args.preset)
    tok = load_tokenizer(assets.student_dir)
    rows = pq.read_table(assets.train_file).to_pylist()
    test = pq.read_table(assets.eval_file).to_pylist()[:args.eval_n]
    data = encode_rows(tok, rows)
    if args.spec:   # a fresh student of another size: hidden,layers,heads,head_dim,intermediate
        spec = build.ModelSpec(*[int(x) for x in args.spec.split(",")])
        model = init_model(build._model_config(spec, tok), seed=1)
    else:
        model = load_pretrained(assets.student_dir, dtype="float32")
    curve, t0 = [], time.perf_counter()
    acc = evaluate_accuracy(model, tok, test)["accuracy"]
    curve.append([0, acc])

    def cb(step, m):
        curve.append([step, evaluate_accuracy(m, tok, test)["accuracy"]])
        print(f"  sft step {step}: accuracy {curve[-1][1]:.3f}", flush=True)
        return False
    sft_train(model, data, steps=args.steps, batch_size=args.batch, learning_rate=args.lr,
              warmup_steps=50, seed=2, progress=False, callback=cb, callback_every=args.every)
    rec = {"name": f"ceiling_sft{'_' + args.spec if args.spec else ''}", "kind": "sft_ceiling",
           "spec": args.spec or "demo student", "params": build._n_params(model), "steps": args.steps,
           "batch": args.batch, "lr": args.lr, "acc0": curve[0][1], "acc": curve[-1][1],
           "best": max(a for _, a in curve), "curve": curve, "wall_s": round(time.perf_counter() - t0, 1),
           "load_avg": round(os.getloadavg()[0], 2), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _append(rec)
    print(json.dumps(rec), flush=True)


def table() -> str:
    """Every distillation run of the JSONL, one row each, in the order they finished."""
    recs = [json.loads(line) for line in open(RUNS) if line.strip()]
    lines = ["| run | steps | batch | lr | overrides | seed | acc0 | acc (curve) | gap closed | train s | "
             "train CPU s | load |", "|---|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---|"]
    for r in recs:
        if r.get("kind") == "sft_ceiling":
            continue
        sets = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["sets"].items()
                         if k not in ("trainer.global_batch_size", "optimizer.lr")) or "–"
        curve = " ".join(f"{a:.2f}" for _, a in r["curve"][1:])
        lines.append(f"| {r['name']} | {r['steps']} | {r['batch']} | {r['lr']:g} | {sets} | {r['seed']} | "
                     f"{r['acc0']:.3f} | **{r['acc']:.3f}** ({curve}) | {r['gap_closed']:.2f} | {r['train_s']:.0f} | "
                     f"{r.get('train_cpu_s', float('nan')):.0f} | {r['load_avg'][0]:.1f}-{r['load_avg'][1]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import logging as pylogging
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    pylogging.getLogger("gold_jax").setLevel(pylogging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--name", required=True)
    r.add_argument("--steps", type=int, default=200)
    r.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--eval_every", type=int, default=100)
    r.add_argument("--run_root", default="/tmp/gold_jax_demo_tuning")
    sub.add_parser("table")
    c = sub.add_parser("ceiling")
    c.add_argument("--cache_dir", default="~/.cache/gold_jax/demo")
    c.add_argument("--preset", default="full")
    c.add_argument("--steps", type=int, default=3000)
    c.add_argument("--batch", type=int, default=64)
    c.add_argument("--lr", type=float, default=3e-3)
    c.add_argument("--every", type=int, default=500)
    c.add_argument("--eval_n", type=int, default=256)
    c.add_argument("--spec", default="", help="hidden,layers,heads,head_dim,intermediate: a fresh student")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.cmd == "table":
        print(table())
        return
    if args.cmd == "ceiling":
        ceiling(args)
        return
    sets = {}
    for s in args.set:
        if "=" not in s:
            ap.error(f"--set {s!r}: expected key=value")
        k, v = s.split("=", 1)
        sets[k] = _parse(v)
    for seed in args.seeds:
        rec = run_one(args.name, args.steps, sets, seed, args.eval_every, args.run_root)
        _append(rec)
        print(f"{rec['name']} seed {seed}: {rec['acc0']:.3f} -> {rec['acc']:.3f} "
              f"(gap closed {rec['gap_closed']:.2f}; curve {rec['curve']}), train {rec['train_s']}s, "
              f"cpu {rec['cpu_s']}s, wall {rec['wall_s']}s, load {rec['load_avg']}", flush=True)


if __name__ == "__main__":
    main()

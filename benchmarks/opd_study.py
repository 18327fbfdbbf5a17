"""OPD vs JSD on the demo task, staleness correction, and the cost of the top-k diagnostics.

Three parts, all on the demo task (configs/gold.py, preset full; assets built
once into ~/.cache/gold_jax/demo), every run in this one process:

1. `gold.loss` jsd vs opd at lmbda = 1 (every batch student-sampled), several
   seeds: exact-match accuracy after the same number of steps, and the wall
   time of each run (accuracy per second of training).
2. OPD under two_step_off (each batch sampled by θ_{t-2}) with and without
   `gold.importance_correction`: accuracy, gold/staleness and the ratio.
3. The step-time overhead of `gold.diagnostics`: the jit'd loss+gradient of a
   real demo batch with the diagnostics on and off, timed alternately in one
   process (ratio of medians).

    python benchmarks/opd_study.py [--steps 150] [--seeds 0 1 2] [--eval_n 256]

Results: benchmarks/results/opd_study.md (table) and opd_study_runs.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/gold_jax_study_jit_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def study_config(args, run_dir: str, seed: int, **over):
    from distill_study import _gold_config, quiet_run  # this script's folder is sys.path[0]
    c = _gold_config()
    c.seed, c.run_dir = seed, run_dir
    c.demo.cache_dir, c.demo.preset, c.demo.eval_n = args.cache_dir, "full", args.eval_n
    c.gold.lmbda = 1.0
    c.gold.beta = 0.5   # the study's JSD rows: beta 0.5 (configs/gold.py's demo default became 0 in issue 18)
    c.trainer.max_steps = args.steps
    c.trainer.global_batch_size = args.batch
    c.optimizer.lr = args.lr
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(args.steps // 10, 1))
    c.trainer.eval_every = 0
    c.update_from_flattened_dict(over)
    return quiet_run(c)


def run_one(args, name: str, seed: int, **over) -> dict:
    from gold_jax.metrics import read_jsonl
    from gold_jax.trainer import Trainer
    run_dir = os.path.join(args.run_root, f"{name}_s{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    last = Trainer(study_config(args, run_dir, seed, **over)).run()
    wall = time.perf_counter() - t0
    evals = read_jsonl(os.path.join(run_dir, "metrics.jsonl"), kind="eval")
    train = read_jsonl(os.path.join(run_dir, "metrics.jsonl"), kind="train")
    get = lambda k: [r[k] for r in train if k in r]  # noqa: E731
    return {"name": name, "seed": seed, "steps": len(train), "acc0": float(evals[0]["eval/accuracy"]),
            "acc": float(last["eval/accuracy"]), "wall_s": wall,
            "train_s": float(np.sum(get("timing/step"))),
            "staleness": float(np.mean(get("gold/staleness") or [np.nan])),
            "ratio_mean": float(np.mean(get("gold/importance_ratio/mean") or [np.nan])),
            "ratio_max": float(np.max(get("gold/importance_ratio/max") or [np.nan])),
            "load_avg": os.getloadavg()[0]}


def diagnostics_overhead(args, n_rep: int = 15) -> dict:
    """Median loss+gradient time of one demo batch, diagnostics on / off, timed alternately."""
    import dataclasses

    import jax

    from gold_jax.batches import train_arrays
    from gold_jax.trainer import Trainer, _global, loss_spec
    from gold_jax.train_step import grads_and_loss
    from gold_jax.fingerprint import tokenizer_size
    run_dir = os.path.join(args.run_root, "diag_overhead")
    shutil.rmtree(run_dir, ignore_errors=True)
    tr = Trainer(study_config(args, run_dir, 0, **{"trainer.max_steps": 2}))
    try:
        pend = tr.producer.produce(0)
        tr.producer.resolve(pend)
        batch = _global(tr.mesh, train_arrays(pend.seq, pend.scores, **_extra(pend)))
        spec = loss_spec(tr.cfg, tr.mesh, tokenizer_size(tr.tokenizer))
        fns = {on: jax.jit(lambda p, b, s=dataclasses.replace(spec, diagnostics=on):
                           grads_and_loss(tr.graphdef, p, b, s, 1, tr.mesh, with_aux=True)) for on in (False, True)}
        times = {False: [], True: []}
        for on in (False, True):
            jax.block_until_ready(fns[on](tr.state.params, batch))
        for _ in range(n_rep):
            for on in (False, True):
                t0 = time.perf_counter()
                jax.block_until_ready(fns[on](tr.state.params, batch))
                times[on].append(time.perf_counter() - t0)
    finally:
        tr.close()
    off, on = float(np.median(times[False])), float(np.median(times[True]))
    return {"off_s": off, "on_s": on, "ratio": on / off, "n_rep": n_rep, "impl": spec.impl}


def _extra(pend) -> dict:
    import inspect

    from gold_jax.batches import train_arrays
    names = inspect.signature(train_arrays).parameters
    return {k: getattr(pend, k) for k in ("rows", "behaviour") if k in names}


def _ms(xs) -> str:
    xs = np.asarray([x for x in xs if np.isfinite(x)], float)
    if len(xs) == 0:
        return "–"
    return f"{xs.mean():.3f} ± {xs.std(ddof=1):.3f}" if len(xs) > 1 else f"{xs.mean():.3f}"


def table(recs: list[dict], diag: dict | None, args) -> str:
    seeds = sorted({r["seed"] for r in recs})
    rows = [("jsd", "JSD (β 0.5), λ 1, one_step_off"), ("opd", "OPD, λ 1, one_step_off"),
            ("opd_2off", "OPD, λ 1, two_step_off, no correction"),
            ("opd_2off_is", "OPD, λ 1, two_step_off, importance correction (cap 2)")]
    lines = [f"## OPD study (demo task, {args.steps} steps, batch {args.batch}, lr {args.lr:g})", "",
             f"Exact-match accuracy on {args.eval_n} held-out prompts (greedy), mean ± std over seeds "
             f"{', '.join(map(str, seeds))}; configs/gold.py otherwise (temperature 0.9, top-k 64 tail).", "",
             "| run | accuracy at step 0 | accuracy | train s / run | gold/staleness | ratio mean | ratio max |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key, label in rows:
        rs = [r for r in recs if r["name"] == key]
        if not rs:
            continue
        lines.append(f"| {label} (n={len(rs)}) | {_ms([r['acc0'] for r in rs])} | **{_ms([r['acc'] for r in rs])}** "
                     f"| {np.mean([r['train_s'] for r in rs]):.0f} | {_ms([r['staleness'] for r in rs])} "
                     f"| {_ms([r['ratio_mean'] for r in rs])} | {_ms([r['ratio_max'] for r in rs])} |")
    if diag:
        lines += ["", f"Diagnostics overhead (loss + gradient of one demo batch, impl {diag['impl']}, medians of "
                  f"{diag['n_rep']} alternating repeats): off {diag['off_s'] * 1e3:.1f} ms, on "
                  f"{diag['on_s'] * 1e3:.1f} ms, ratio **{diag['ratio']:.3f}**."]
    loads = [r["load_avg"] for r in recs]
    lines += ["", f"{len(recs)} runs, {np.sum([r['wall_s'] for r in recs]) / 60:.1f} min in all, 2-core CPU shared "
              f"with other jobs (1-min load average {min(loads):.1f}–{max(loads):.1f})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--stale_seeds", type=int, nargs="+", default=None, help="seeds of part 2 (default --seeds)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval_n", type=int, default=256)
    ap.add_argument("--cache_dir", default="~/.cache/gold_jax/demo")
    ap.add_argument("--run_root", default="/tmp/gold_jax_opd_study")
    ap.add_argument("--parts", default="123")
    args = ap.parse_args()
    from gold_jax.demo.build import ensure_demo_assets
    ensure_demo_assets(args.cache_dir, preset="full")
    os.makedirs(RESULTS, exist_ok=True)
    recs, diag = [], None
    plan = []
    if "1" in args.parts:
        plan += [("jsd", s, {"gold.loss": "jsd"}) for s in args.seeds]
        plan += [("opd", s, {"gold.loss": "opd"}) for s in args.seeds]
    if "2" in args.parts:
        for s in args.stale_seeds or args.seeds:
            plan.append(("opd_2off", s, {"gold.loss": "opd", "trainer.scheduler": "two_step_off"}))
            plan.append(("opd_2off_is", s, {"gold.loss": "opd", "trainer.scheduler": "two_step_off",
                                             "gold.importance_correction": True}))
    for name, seed, over in plan:
        rec = run_one(args, name, seed, **over)
        recs.append(rec)
        print(json.dumps(rec), flush=True)
    if "3" in args.parts:
        diag = diagnostics_overhead(args)
        print(json.dumps(diag), flush=True)
    json.dump({"runs": recs, "diagnostics": diag, "args": vars(args)},
              open(os.path.join(RESULTS, "opd_study_runs.json"), "w"), indent=1)
    text = table(recs, diag, args)
    open(os.path.join(RESULTS, "opd_study.md"), "w").write("# OPD study (benchmarks/opd_study.py)\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()

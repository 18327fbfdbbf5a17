"""How close the top-k teacher losses come to the dense loss on the demo's real distributions.

The teacher server ships only its top-k log-probs (plus the exact log-mass of
that set), so the trainer's loss is an approximation of the dense generalized
JSD. This measures the approximation where it matters: the demo teacher's
logits on held-out prompt + completion sequences, against the warmed-up demo
student, at the recipe's temperature 0.9.

  tail         k ids + one "rest of vocabulary" bucket, JSD over k+1 outcomes (ours)
  renormalize  teacher top-k renormalised, rest dropped (verl)

For each (source, beta, k, mode): the signed relative error of the batch loss
(topk / dense - 1; tail is a lower bound, so <= 0), the median per-token |relative
error|, and the relative L2 error of the gradient w.r.t. the student logits (what
training sees). Sources: the eval file's ground-truth completions (off-policy
data) and the student's own samples at temperature 0.9 (on-policy data).
The models run in float32 (the logits are the distributions studied); the
losses are then compared in float64, so the errors are the approximation's,
not rounding.

    python benchmarks/distill_study.py [--preset full] [--n 256] [--cache_dir DIR]

Part 2 (`sweep`): on the demo task, the student's exact-match accuracy after the
same number of GOLD steps for lmbda in {0, 0.5, 1} x beta in {0, 0.5, 1}, several
seeds each (config.seed: λ coins, data order, sampling), against the warmed-up
student (measured at step 0 of every run) and the teacher (assets.json). All
runs share one process, one after another; the table (mean ± std over seeds)
goes to benchmarks/results/distill_study.md. Finished runs are kept in a JSON
file next to it, so an interrupted sweep resumes where it stopped.

    python benchmarks/distill_study.py sweep [--steps 200] [--seeds 0 1 2] [--eval_n 256]

Part 3 (`sweep --task chain`, issue 18): the same sweep on the chain task
(gold_jax/demo/chain_task.py: 59-token modular-arithmetic chains, dataset
completions in another style than the teacher's), plus one row of plain SFT on
the dataset completions (gold_jax/demo/sft.py) at the same steps, batch and lr,
and diagnostics of the warmed-up student (accuracy of its own T=0.9 samples,
the teacher's per-token NLL of student samples and of both completion styles).
Each run is appended to benchmarks/results/distill_study_chain_runs.jsonl as it
finishes (a rerun skips the runs found there); the tables go to
benchmarks/results/distill_study_chain.md.

    python benchmarks/distill_study.py sweep --task chain [--steps 150] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if sys.argv[1:2] == ["sweep"]:
    # The 27 runs compile the same programs (same shapes; beta is the only static difference):
    # a persistent compilation cache lets every Trainer after the first reuse them.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/gold_jax_study_jit_cache")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq

from gold_jax.config import base_config
from gold_jax.data import load_tokenizer
from gold_jax.demo.build import ensure_demo_assets
from gold_jax.demo.sft import encode_rows
from gold_jax.losses import generalized_jsd, topk_jsd
from gold_jax.models.hf_io import load_pretrained
from gold_jax.rollout.jax_sampler import JaxSampler
from gold_jax.types import SequenceBatch

KS, BETAS, MODES, TEMPERATURE = (4, 16, 64), (0.0, 0.5, 1.0), ("tail", "renormalize"), 0.9


def completion_logits(model, batch: SequenceBatch) -> np.ndarray:
    """float64 logits [B, R, V] at the positions that predict the completion tokens."""
    p, r = batch.completion_start, batch.completion_ids.shape[1]
    logits = model(jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask))
    return np.asarray(logits[:, p - 1:p + r - 1], np.float64)


def student_samples(student, tokenizer, rows, seed: int = 0) -> SequenceBatch:
    enc = encode_rows(tokenizer, [{"prompt": r["prompt"]} for r in rows])
    sampler = JaxSampler(student, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    out = sampler.generate(enc.prompt_ids, enc.prompt_mask, n=1, max_new_tokens=16,
                           temperature=TEMPERATURE, seed=seed)
    return SequenceBatch(out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask)


def compare(s_logits: np.ndarray, t_logits: np.ndarray, mask: np.ndarray) -> list[dict]:
    """One record per (beta, k, mode): relative errors of the top-k losses against the dense one."""
    s, t, m = jnp.asarray(s_logits), jnp.asarray(t_logits), jnp.asarray(mask, jnp.float64)
    t_logp = jax.nn.log_softmax(t / TEMPERATURE, axis=-1)  # what the teacher server computes
    keep = np.asarray(mask, bool)
    out = []
    for beta in BETAS:
        def dense(x, red="batchmean"):
            return generalized_jsd(x, t, m, beta=beta, temperature=TEMPERATURE, reduction=red)
        d_loss, d_grad = jax.value_and_grad(dense)(s)
        d_tok = np.asarray(dense(s, "none"))[keep]
        for k in KS:
            lp, ids = jax.lax.top_k(t_logp, k)
            logmass = jax.nn.logsumexp(lp, axis=-1)
            for mode in MODES:
                def approx(x, red="batchmean"):
                    return topk_jsd(x, lp, ids, m, beta=beta, temperature=TEMPERATURE, reduction=red,
                                    mode=mode, teacher_logmass=logmass)
                a_loss, a_grad = jax.value_and_grad(approx)(s)
                a_tok = np.asarray(approx(s, "none"))[keep]
                tok_err = np.abs(a_tok - d_tok) / np.maximum(np.abs(d_tok), 1e-12)
                out.append({
                    "beta": beta, "k": k, "mode": mode, "dense": float(d_loss), "topk": float(a_loss),
                    "rel_err": float(a_loss / d_loss - 1.0), "tok_med_abs_err": float(np.median(tok_err)),
                    "grad_rel_err": float(jnp.linalg.norm(a_grad - d_grad) / jnp.linalg.norm(d_grad)),
                    "teacher_topk_mass": float(np.exp(np.asarray(logmass))[keep].mean()),
                })
    return out


def print_table(source: str, recs: list[dict], n_seq: int, n_tok: int) -> None:
    print(f"\n### {source}: {n_seq} sequences, {n_tok} completion tokens, T={TEMPERATURE}\n")
    print("| beta | k | teacher top-k mass | dense loss | tail rel.err | renorm rel.err | "
          "tail tok med | renorm tok med | tail grad err | renorm grad err |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    by = {(r["beta"], r["k"], r["mode"]): r for r in recs}
    for beta in BETAS:
        for k in KS:
            tl, rn = by[(beta, k, "tail")], by[(beta, k, "renormalize")]
            print(f"| {beta:g} | {k} | {tl['teacher_topk_mass']:.6f} | {tl['dense']:.4g} | "
                  f"{tl['rel_err']:+.2e} | {rn['rel_err']:+.2e} | {tl['tok_med_abs_err']:.1e} | "
                  f"{rn['tok_med_abs_err']:.1e} | {tl['grad_rel_err']:.1e} | {rn['grad_rel_err']:.1e} |")


def part1(cache_dir: str, preset: str, n: int, seed: int = 0) -> dict[str, list[dict]]:
    """Top-k vs dense loss on the demo teacher's distributions; prints and returns the records."""
    assets = ensure_demo_assets(cache_dir, preset=preset)
    tok = load_tokenizer(assets.teacher_dir)
    teacher = load_pretrained(assets.teacher_dir, dtype="float32")
    student = load_pretrained(assets.student_dir, dtype="float32")
    rows = pq.read_table(assets.eval_file).to_pylist()[:n]
    print(f"demo preset {preset}: teacher accuracy {assets.info['teacher']['accuracy']:.3f}, "
          f"student accuracy {assets.info['student']['accuracy']:.3f}, vocab {len(tok)}, "
          f"{len(rows)} held-out prompts")
    sources = {"ground-truth completions (off-policy)": encode_rows(tok, rows),
               "student samples at T=0.9 (on-policy)": student_samples(student, tok, rows, seed)}
    logits = {name: (completion_logits(student, b), completion_logits(teacher, b))
              for name, b in sources.items()}
    jax.config.update("jax_enable_x64", True)  # after the models and the sampler, which assume int32 indices
    results = {}
    for name, batch in sources.items():
        t0 = time.perf_counter()
        recs = compare(*logits[name], batch.completion_mask)
        print_table(name, recs, len(rows), int(batch.completion_mask.sum()))
        print(f"\n({time.perf_counter() - t0:.1f}s)")
        results[name] = recs
    return results


# ---------------------------------------------------------------------------- part 2: the sweep
LMBDAS, SWEEP_BETAS = (0.0, 0.5, 1.0), (0.0, 0.5, 1.0)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _gold_config():
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "gold.py")
    spec = importlib.util.spec_from_file_location("gold_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def quiet_run(c):
    """A benchmark run: no completions log, TensorBoard, progress bar or checkpoints (figures only)."""
    c.trainer.log_completions_every = 0
    c.trainer.tensorboard = False
    c.trainer.progress_bar = False
    c.checkpoint.enabled = False
    return c


def sweep_config(args, lmbda: float, beta: float, seed: int, run_dir: str):
    """configs/gold.py plus the study's overrides (everything else: the recipe's defaults)."""
    c = _gold_config()
    c.seed = seed
    c.run_dir = run_dir
    c.demo.cache_dir, c.demo.preset, c.demo.eval_n = args.cache_dir, args.preset, args.eval_n
    c.demo.task = getattr(args, "task", "sort")
    c.gold.lmbda, c.gold.beta = lmbda, beta
    c.trainer.max_steps = args.steps
    c.trainer.global_batch_size = args.batch
    c.optimizer.lr = args.lr
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(args.steps // 10, 1))
    c.trainer.eval_every = 0            # accuracy at step 0 and at the end only; no validation-loss passes
    return quiet_run(c)


def _run_one(args, lmbda: float, beta: float, seed: int) -> dict:
    import shutil
    from gold_jax.metrics import read_jsonl
    from gold_jax.trainer import Trainer
    run_dir = os.path.join(args.run_root, f"{getattr(args, 'task', 'sort')}_l{lmbda:g}_b{beta:g}_s{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    last = Trainer(sweep_config(args, lmbda, beta, seed, run_dir)).run()
    evals = read_jsonl(os.path.join(run_dir, "metrics.jsonl"), kind="eval")
    train = read_jsonl(os.path.join(run_dir, "metrics.jsonl"), kind="train")
    return {"lmbda": lmbda, "beta": beta, "seed": seed, "steps": len(train),
            "acc0": float(evals[0]["eval/accuracy"]), "acc": float(last["eval/accuracy"]),
            "well_formed": float(last.get("eval/well_formed", float("nan"))),
            "on_policy_ratio": float(last["gold/on_policy_ratio"]),
            "loss_first": float(np.mean([r["actor/jsd_loss"] for r in train[:5]])),
            "loss_last": float(np.mean([r["actor/jsd_loss"] for r in train[-5:]])),
            "wall_s": time.perf_counter() - t0, "load_avg": os.getloadavg()[0]}


def _ms(xs) -> str:
    xs = np.asarray(xs, float)
    if len(xs) == 0:
        return "–"
    return f"{xs.mean():.3f} ± {xs.std(ddof=1):.3f}" if len(xs) > 1 else f"{xs.mean():.3f}"


def sweep_table(recs: list[dict], args, teacher_acc: float, student_acc_build: float, n_build: int) -> str:
    seeds = sorted({r["seed"] for r in recs})
    acc0 = [r["acc0"] for r in recs if r["lmbda"] == LMBDAS[0] and r["beta"] == SWEEP_BETAS[0]] or \
        [r["acc0"] for r in recs]
    lines = [f"## Student accuracy after {args.steps} GOLD steps (demo task, preset {args.preset})", "",
             f"Exact-match accuracy on {args.eval_n} held-out prompts (greedy), mean ± std over seeds "
             f"{', '.join(map(str, seeds))}; batch {args.batch}, lr {args.lr:g}, temperature 0.9, top-k 64 "
             f"(tail), scheduler one_step_off (configs/gold.py defaults otherwise).", "",
             f"- teacher: **{teacher_acc:.3f}** (assets.json: greedy, {n_build} held-out prompts)",
             f"- warmed-up student before distillation: **{_ms(acc0)}** (measured at step 0 of each run; "
             f"assets.json: {student_acc_build:.3f} on 500 prompts)", "",
             "| lmbda \\ beta | " + " | ".join(f"{b:g}" for b in SWEEP_BETAS) + " | row mean |",
             "|---|" + "---:|" * (len(SWEEP_BETAS) + 1)]
    for lm in LMBDAS:
        cells, row = [], []
        for b in SWEEP_BETAS:
            xs = [r["acc"] for r in recs if r["lmbda"] == lm and r["beta"] == b]
            cells.append(f"{_ms(xs)} (n={len(xs)})" if len(xs) != len(seeds) else _ms(xs))
            row += xs
        lines.append(f"| {lm:g} | " + " | ".join(cells) + f" | {_ms(row)} |")
    col = [_ms([r["acc"] for r in recs if r["beta"] == b]) for b in SWEEP_BETAS]
    lines.append("| col mean | " + " | ".join(col) + " | |")
    lines += ["", "beta 0 = forward KL(teacher||student), 1 = reverse KL; lmbda = probability of a "
              "student-generated (on-policy) batch.", "",
              "Final training loss (JSD, mean of the last 5 steps; not comparable across beta):", "",
              "| lmbda \\ beta | " + " | ".join(f"{b:g}" for b in SWEEP_BETAS) + " |",
              "|---|" + "---:|" * len(SWEEP_BETAS)]
    for lm in LMBDAS:
        lines.append(f"| {lm:g} | " + " | ".join(
            f"{np.mean([r['loss_last'] for r in recs if r['lmbda'] == lm and r['beta'] == b] or [np.nan]):.4f}"
            for b in SWEEP_BETAS) + " |")
    walls = [r["wall_s"] for r in recs]
    loads = [r["load_avg"] for r in recs]
    lines += ["", f"{len(recs)} runs, {np.sum(walls) / 60:.1f} min in all ({np.mean(walls):.0f} s per run incl. "
              f"model load, compilation and both evaluations), 2-core CPU, 1-min load average "
              f"{np.min(loads):.1f}–{np.max(loads):.1f} during the runs."]
    return "\n".join(lines) + "\n"


def part2(args) -> None:
    if args.task == "chain":
        from chain_study import part3   # benchmarks/chain_study.py: the chain task's sweep, SFT row, diagnostics
        part3(args, _run_one)
        return
    import json
    import logging as pylogging
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    pylogging.getLogger("gold_jax").setLevel(pylogging.WARNING)
    assets = ensure_demo_assets(args.cache_dir, preset=args.preset)
    teacher_acc, student_acc = assets.info["teacher"]["accuracy"], assets.info["student"]["accuracy"]
    os.makedirs(RESULTS, exist_ok=True)
    state_path = os.path.join(RESULTS, "distill_study_runs.json")
    keys = ("steps", "batch", "lr", "eval_n", "preset")   # one table per setting; runs of every setting are kept
    everything: list[dict] = []
    if os.path.exists(state_path) and not args.fresh:
        everything = json.load(open(state_path))
    mine = lambda r: all(r.get(k) == getattr(args, k) for k in keys)  # noqa: E731
    done = {(r["lmbda"], r["beta"], r["seed"]) for r in everything if mine(r)}
    todo = [(lm, b, s) for s in args.seeds for lm in LMBDAS for b in SWEEP_BETAS if (lm, b, s) not in done]
    print(f"sweep: {len(todo)} runs to do ({len(done)} kept from {state_path}), {args.steps} steps each",
          flush=True)
    for i, (lm, b, s) in enumerate(todo):
        r = _run_one(args, lm, b, s)
        r.update({k: getattr(args, k) for k in keys})
        everything.append(r)
        json.dump(everything, open(state_path, "w"), indent=1)
        print(f"[{i + 1}/{len(todo)}] lmbda={lm:g} beta={b:g} seed={s}: accuracy {r['acc0']:.3f} -> "
              f"{r['acc']:.3f}, on-policy {r['on_policy_ratio']:.2f}, loss {r['loss_first']:.4f} -> "
              f"{r['loss_last']:.4f}, {r['wall_s']:.0f}s, load {r['load_avg']:.1f}", flush=True)
    settings = sorted({tuple(r[k] for k in keys) for r in everything}, key=lambda t: (t[0] != 200, t))
    sections = []
    for st in settings:
        ns = argparse.Namespace(**dict(zip(keys, st)))
        recs = [r for r in everything if tuple(r[k] for k in keys) == st]
        sections.append(sweep_table(recs, ns, teacher_acc, student_acc, assets.info.get("eval_n", 0)))
    with open(os.path.join(RESULTS, "distill_study.md"), "w") as f:
        f.write("# Distillation study (benchmarks/distill_study.py sweep)\n\n" + "\n".join(sections))
    print("\n" + sweep_table([r for r in everything if mine(r)], args, teacher_acc, student_acc,
                             assets.info.get("eval_n", 0)))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "sweep":
        ap = argparse.ArgumentParser(description="part 2: accuracy after N steps over lmbda x beta x seeds")
        ap.add_argument("--cache_dir", default=base_config().demo.cache_dir)
        ap.add_argument("--preset", default="full", choices=("full", "tiny"))
        ap.add_argument("--steps", type=int, default=200)
        ap.add_argument("--batch", type=int, default=16)
        ap.add_argument("--lr", type=float, default=3e-4)
        ap.add_argument("--eval_n", type=int, default=256)
        ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        ap.add_argument("--run_root", default="/tmp/gold_jax_distill_study")
        ap.add_argument("--fresh", action="store_true", help="ignore runs kept from an earlier sweep")
        ap.add_argument("--task", default="sort", choices=("sort", "chain"),
                        help="chain: issue 18's task (results in distill_study_chain.md)")
        ap.add_argument("--sft_seeds", type=int, nargs="*", default=None,
                        help="chain: seeds of the SFT row (default: --seeds)")
        ap.add_argument("--no_sweep", action="store_true", help="chain: diagnostics and SFT row only")
        ap.add_argument("--stop_at", default="", help="chain: UTC HH:MM after which no new run starts")
        args = ap.parse_args(argv[1:])
        args.cache_dir = os.path.expanduser(args.cache_dir)
        part2(args)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache_dir", default=base_config().demo.cache_dir)
    ap.add_argument("--preset", default="full", choices=("full", "tiny"))
    ap.add_argument("--n", type=int, default=256, help="held-out prompts (sequences per source)")
    ap.add_argument("--seed", type=int, default=0, help="student sampling seed")
    args = ap.parse_args(argv)
    if args.n < 1:
        sys.exit("--n must be >= 1")
    part1(os.path.expanduser(args.cache_dir), args.preset, args.n, args.seed)


if __name__ == "__main__":
    main()

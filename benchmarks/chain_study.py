"""Issue 18's study on the chain task (run through `distill_study.py sweep --task chain`).

Kept apart from distill_study.py so that the sorting sweep stays as it was: this
file adds the SFT row, the diagnostics of the warmed-up student and JSONL
results written run by run (a cut-off study still yields its figures).
"""
from __future__ import annotations

import argparse
import json
import logging as pylogging
import os
import re
import time
from collections.abc import Callable

import numpy as np
import pyarrow.parquet as pq

from gold_jax.demo import chain_task

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RUNS = os.path.join(RESULTS, "distill_study_chain_runs.jsonl")
TABLE = os.path.join(RESULTS, "distill_study_chain.md")
LMBDAS, BETAS = (0.0, 0.5, 1.0), (0.0, 0.5, 1.0)
KEYS = ("steps", "batch", "lr", "eval_n", "preset", "task_version")   # one table per setting


def _load(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _append(path: str, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def diagnostics(assets, n: int = 256, seed: int = 0) -> dict:
    """The warmed-up student against the teacher: how good its own samples are, and how the
    teacher scores them next to the two completion styles (per-token NLL, lower = more teacher-like)."""
    import jax.numpy as jnp
    from gold_jax.data import load_tokenizer
    from gold_jax.demo.sft import completion_nll, encode_rows
    from gold_jax.models.hf_io import load_pretrained
    from gold_jax.rollout.jax_sampler import JaxSampler
    from gold_jax.types import SequenceBatch

    tok = load_tokenizer(assets.teacher_dir)
    teacher = load_pretrained(assets.teacher_dir, dtype="float32")
    student = load_pretrained(assets.student_dir, dtype="float32")
    rows = pq.read_table(assets.eval_file).to_pylist()[:n]
    enc = encode_rows(tok, [{"prompt": r["prompt"]} for r in rows])
    sampler = JaxSampler(student, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    out = sampler.generate(enc.prompt_ids, enc.prompt_mask, n=1, max_new_tokens=chain_task.MAX_NEW_TOKENS,
                           temperature=0.9, seed=seed)
    texts = [tok.decode(out.completion_ids[i][out.completion_mask[i] == 1].tolist(), skip_special_tokens=True)
             for i in range(len(rows))]
    sampler.close()
    samples = SequenceBatch(out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask)
    sources = {"student_samples_T0.9": samples, "style_A_teacher": encode_rows(
        tok, rows, response_key=chain_task.TEACHER_STYLE_KEY), "style_B_dataset": encode_rows(tok, rows)}
    res = {"kind": "diag", "n": len(rows),
           "student_sample_accuracy": float(np.mean([chain_task.score_completion(r, t)
                                                      for r, t in zip(rows, texts)])),
           "student_sample_well_formed": float(np.mean([chain_task.is_well_formed(t) for t in texts])),
           "student_sample_tokens": float(out.completion_mask.sum(1).mean())}
    for name, b in sources.items():
        args = [jnp.asarray(x) for x in (b.input_ids, b.attention_mask, b.completion_ids, b.completion_mask)]
        res[f"teacher_nll/{name}"] = float(completion_nll(teacher, *args))
        res[f"student_nll/{name}"] = float(completion_nll(student, *args))
    # Where the student's samples first go wrong: the first wrong running value (style A, b=7*3=1).
    first_err = []
    for r, t in zip(rows, texts):
        start, ops = chain_task.parse_prompt(r["prompt"][0]["content"])
        want = chain_task.values(start, ops)[1:]
        got = [int(v) for v in re.findall(r"(?:^|\s)[a-z]=[0-9][+*][0-9]=([0-9])(?=\s|$)", t)]
        bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
        first_err.append(bad[0] / len(want) if bad else (1.0 if len(got) >= len(want) else len(got) / len(want)))
    res["student_sample_first_error_frac"] = float(np.mean(first_err))
    return res


def sft_run(assets, args, seed: int, response_key: str) -> dict:
    """The warmed-up student trained by plain SFT on `response_key` completions at the study's budget."""
    from gold_jax.data import load_tokenizer
    from gold_jax.demo.evaluate import evaluate_accuracy
    from gold_jax.demo.sft import encode_rows, sft_train
    from gold_jax.models.hf_io import load_pretrained
    t0 = time.perf_counter()
    tok = load_tokenizer(assets.student_dir)
    student = load_pretrained(assets.student_dir, dtype="float32")
    train = pq.read_table(assets.train_file).to_pylist()
    rows = pq.read_table(assets.eval_file).to_pylist()[:args.eval_n]
    data = encode_rows(tok, train, response_key=response_key)
    acc0 = evaluate_accuracy(student, tok, rows)["accuracy"]
    losses = sft_train(student, data, steps=args.steps, batch_size=args.batch, learning_rate=args.lr,
                       warmup_steps=min(10, max(args.steps // 10, 1)), seed=seed, progress=False)
    res = evaluate_accuracy(student, tok, rows)
    return {"kind": "sft", "response_key": response_key, "seed": seed, "acc0": acc0, "acc": res["accuracy"],
            "well_formed": res["well_formed"], "loss_first": float(np.mean(losses[:5])),
            "loss_last": float(np.mean(losses[-5:])), "wall_s": time.perf_counter() - t0,
            "load_avg": os.getloadavg()[0]}


def _ms(xs) -> str:
    xs = np.asarray(xs, float)
    if len(xs) == 0:
        return "–"
    return f"{xs.mean():.3f} ± {xs.std(ddof=1):.3f}" if len(xs) > 1 else f"{xs.mean():.3f} (n=1)"


def table(recs: list[dict], args, info: dict) -> str:
    gold = [r for r in recs if r["kind"] == "gold"]
    sft = [r for r in recs if r["kind"] == "sft"]
    diag = [r for r in recs if r["kind"] == "diag"]
    acc0 = [r["acc0"] for r in gold] or [r["acc0"] for r in sft]
    lines = [f"## Chain task: student accuracy after {args.steps} steps (preset chain-{args.preset})", "",
             f"Exact match of the final answer on {args.eval_n} held-out prompts (greedy), mean ± std over seeds; "
             f"batch {args.batch}, lr {args.lr:g}, temperature 0.9, top-k 64 (tail), scheduler one_step_off "
             "(configs/gold.py defaults otherwise). Off-policy batches use the parquet's style-B completions.", "",
             f"- teacher: **{info['teacher']['accuracy']:.3f}** (assets.json: greedy, {info.get('eval_n')} "
             f"held-out prompts; {info['teacher']['params']} parameters, {info['teacher']['layers']} layers)",
             f"- warmed-up student before training: **{_ms(acc0[:1])}** at step 0 (assets.json: "
             f"{info['student']['accuracy']:.3f}; {info['student']['params']} parameters, "
             f"{info['student']['layers']} layers)", "",
             "| lmbda \\ beta | " + " | ".join(f"{b:g}" for b in BETAS) + " | row mean |",
             "|---|" + "---:|" * (len(BETAS) + 1)]
    for lm in LMBDAS:
        cells, row = [], []
        for b in BETAS:
            xs = [r["acc"] for r in gold if r["lmbda"] == lm and r["beta"] == b]
            cells.append(f"{_ms(xs)} (n={len(xs)})" if xs and len(xs) != 3 else _ms(xs))
            row += xs
        lines.append(f"| {lm:g} | " + " | ".join(cells) + f" | {_ms(row)} |")
    for key, name in ((("response"), "SFT on the dataset's completions (style B)"),
                      (chain_task.TEACHER_STYLE_KEY, "SFT on teacher-style completions (style A, control)")):
        xs = [r["acc"] for r in sft if r["response_key"] == key]
        if xs:
            lines.append(f"| {name} | {_ms(xs) if len(xs) == 1 else f'{_ms(xs)} (n={len(xs)})'} | | | |")
    if gold:
        lines += ["", "On-policy minus off-policy (lmbda 1 - lmbda 0), per beta, paired by seed (mean ± std):", ""]
        for b in BETAS:
            on = {r["seed"]: r["acc"] for r in gold if r["lmbda"] == 1.0 and r["beta"] == b}
            off = {r["seed"]: r["acc"] for r in gold if r["lmbda"] == 0.0 and r["beta"] == b}
            diffs = [on[k] - off[k] for k in sorted(on.keys() & off.keys())]
            if diffs:
                sd = f" ± {np.std(diffs, ddof=1):.3f}" if len(diffs) > 1 else ""
                lines.append(f"- beta {b:g}: {np.mean(diffs):+.3f}{sd} (seeds {sorted(on.keys() & off.keys())}; "
                             f"ahead in {sum(d > 0 for d in diffs)} of {len(diffs)})")
    trl = [r for r in recs if r["kind"] == "trl"]
    if trl:
        beta = trl[0]["beta"]
        lines += ["", f"TRL cross-check of the lmbda ends (benchmarks/chain_trl_check.py): TRL's GKDTrainer on the "
                  f"same student, teacher and parquet, same steps, batch, lr, beta {beta:g} and temperature, each "
                  "trained student scored here with the same greedy exact match:", "",
                  "| lmbda | TRL GKDTrainer | gold_jax (same beta) |", "|---|---:|---:|"]
        for lm in (0.0, 1.0):
            xs = [r["acc"] for r in trl if r["lmbda"] == lm and r["beta"] == beta]
            ours = [r["acc"] for r in gold if r["lmbda"] == lm and r["beta"] == beta]
            lines.append(f"| {lm:g} | {_ms(xs)} | {_ms(ours)} |")
    if diag:
        d = diag[-1]
        lines += ["", f"Warmed-up student, {d['n']} held-out prompts: its own samples at T=0.9 are "
                  f"{d['student_sample_accuracy']:.3f} correct ({d['student_sample_well_formed']:.3f} well formed, "
                  f"{d['student_sample_tokens']:.1f} tokens on average; first wrong intermediate value at "
                  f"{d['student_sample_first_error_frac']:.2f} of the chain on average).", "",
                  "| per-token NLL of | teacher | student |", "|---|---:|---:|"]
        for name in ("student_samples_T0.9", "style_A_teacher", "style_B_dataset"):
            lines.append(f"| {name} | {d[f'teacher_nll/{name}']:.3f} | {d[f'student_nll/{name}']:.3f} |")
    walls = [r["wall_s"] for r in gold]
    if walls:
        loads = [r["load_avg"] for r in gold]
        lines += ["", f"{len(gold)} GOLD runs, {np.mean(walls):.0f} s per run on average (incl. model load, "
                  f"compilation and both evaluations), 2-core CPU shared with other jobs (1-min load average "
                  f"{np.min(loads):.1f}–{np.max(loads):.1f})."]
    return "\n".join(lines) + "\n"


def write_tables(recs: list[dict], args, info: dict) -> None:
    """TABLE: one section per setting of this task version (the longest budget first)."""
    settings = sorted({tuple(r.get(k) for k in KEYS) for r in recs if r.get("task_version") == args.task_version},
                      key=lambda t: -t[0])
    sections = []
    for values in settings:
        a = argparse.Namespace(**{**vars(args), **dict(zip(KEYS, values))})
        sections.append(table([r for r in recs if tuple(r.get(k) for k in KEYS) == values], a, info))
    with open(TABLE, "w") as f:
        f.write("# Distillation study on the chain task (benchmarks/distill_study.py sweep --task chain)\n\n"
                + "\n".join(sections))


def part3(args, run_one: Callable) -> None:
    from absl import logging as absl_logging
    from gold_jax.demo.build import ensure_demo_assets
    absl_logging.set_verbosity(absl_logging.WARNING)
    pylogging.getLogger("gold_jax").setLevel(pylogging.WARNING)
    assets = ensure_demo_assets(args.cache_dir, preset=args.preset, task="chain")
    os.makedirs(RESULTS, exist_ok=True)
    args.task_version = chain_task.VERSION
    setting = {k: getattr(args, k) for k in KEYS}
    everything = [] if args.fresh else _load(RUNS)
    mine = [r for r in everything if all(r.get(k) == v for k, v in setting.items())]

    def record(rec: dict) -> None:
        rec.update(setting)
        _append(RUNS, rec)
        mine.append(rec)
        everything.append(rec)
        write_tables(everything, args, assets.info)

    if not any(r["kind"] == "diag" for r in mine):
        rec = diagnostics(assets, n=args.eval_n)
        record(rec)
        print("diagnostics:", json.dumps(rec), flush=True)
    sft_seeds = args.seeds if args.sft_seeds is None else args.sft_seeds

    def late() -> bool:
        """Past --stop_at (UTC HH:MM): start nothing new (a shared machine's time slot)."""
        if args.stop_at and time.strftime("%H:%M", time.gmtime()) >= args.stop_at:
            print(f"past --stop_at {args.stop_at} UTC: no new runs", flush=True)
            return True
        return False

    def sft_rows(keys) -> None:
        for key in keys:
            for s in sft_seeds:
                if late():
                    return
                if any(r["kind"] == "sft" and r["response_key"] == key and r["seed"] == s for r in mine):
                    continue
                rec = sft_run(assets, args, s, key)
                record(rec)
                print(f"SFT on {key} seed={s}: {rec['acc0']:.3f} -> {rec['acc']:.3f}, {rec['wall_s']:.0f}s",
                      flush=True)

    if args.no_sweep:
        sft_rows(("response", chain_task.TEACHER_STYLE_KEY))
        return
    done = {(r["lmbda"], r["beta"], r["seed"]) for r in mine if r["kind"] == "gold"}
    # The lmbda ends first, pair by pair (beta 0.5, the recipe's, first), within each seed: a study cut
    # off by time still compares them; the SFT rows after the first pair.
    todo = [(lm, b, s) for s in args.seeds for b in (0.5, 0.0, 1.0) for lm in (0.0, 1.0)]
    todo += [(0.5, b, s) for s in args.seeds for b in (0.5, 0.0, 1.0)]
    todo = [t for t in todo if t not in done]
    print(f"chain sweep: {len(todo)} runs to do ({len(done)} kept from {RUNS}), {args.steps} steps each",
          flush=True)
    for i, (lm, b, s) in enumerate(todo):
        if i == 2:
            sft_rows(("response",))
        if late():
            break
        rec = run_one(args, lm, b, s)
        rec["kind"] = "gold"
        record(rec)
        print(f"[{i + 1}/{len(todo)}] lmbda={lm:g} beta={b:g} seed={s}: accuracy {rec['acc0']:.3f} -> "
              f"{rec['acc']:.3f}, on-policy {rec['on_policy_ratio']:.2f}, {rec['wall_s']:.0f}s, "
              f"load {rec['load_avg']:.1f}", flush=True)
    sft_rows(("response", chain_task.TEACHER_STYLE_KEY))
    write_tables(everything, args, assets.info)
    print("\n" + table(mine, args, assets.info))

"""Full GOLD training steps: gold_jax vs TRL's GKDTrainer, tokens/s on CPU, as ratios in one run.

Both sides train the embedded demo's student (Qwen3, HF format) against its
teacher, on the same demo training rows (verl parquet: chat prompt + response),
with the same batch size, optimizer (AdamW, lr 3e-4, clipping 1.0), beta 0.5,
temperature 0.9, at most 16 new tokens per completion and 48 tokens per sequence:

  lmbda 0  off-policy: dataset completions, teacher scoring, student update
  lmbda 1  on-policy: the student samples the completions first (T = 0.9)

A step is everything between two optimizer updates: data, generation, teacher
(gold_jax: the embedded teacher server's top-k 64 + tail bucket; TRL: a full
teacher forward in the same process), student forward/backward and the update.
tokens/s = real (non-padding) prompt + completion tokens of the trained
sequences / wall time of the timed steps (after `--warmup` steps that include
compilation). TRL (torch + trl, not project dependencies) runs in its own
virtualenv through a subprocess of this same file:

    python3 -m venv .venv-trl && .venv-trl/bin/pip install torch==2.13.0 && .venv-trl/bin/pip install trl
    python benchmarks/train_bench.py [--steps 30] [--batch 16] [--trl_python .venv-trl/bin/python]

gold_jax runs with the `sync` scheduler (the same algorithm as TRL's
synchronous loop) and with `one_step_off` (the recipe default: the next batch
is generated with one-update-stale weights while the update runs). The
one_step_off / sync step-time ratio at lmbda 1 is reported next to the mean
generation and update times, so one sees whether they were similar; it is a
measurement, never an assertion. The machine load (1-min load average) is
printed with every figure: on a shared CPU the absolute numbers move, the
ratios measured back to back in one run much less.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BETA, TEMPERATURE, LR, MAX_NEW, MAX_PROMPT = 0.5, 0.9, 3e-4, 16, 32


LINES: list[str] = []


def say(line: str) -> None:
    """Print a result line and keep it for benchmarks/results/train_bench.md."""
    print(line, flush=True)
    LINES.append(line)


def _load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def read_rows(train_file: str, n: int) -> list[dict]:
    import pyarrow.parquet as pq
    return pq.read_table(train_file, columns=["prompt", "response"]).slice(0, n).to_pylist()


# ------------------------------------------------------------------------------------------ TRL half
def trl_worker(args) -> None:
    """Runs inside .venv-trl: GKDTrainer on the demo models; prints one JSON line per lmbda."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:  # trl < 1.0
        from trl import GKDConfig, GKDTrainer
    import trl

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads[0])
    tok = AutoTokenizer.from_pretrained(args.student_dir)
    rows = read_rows(args.train_file, args.batch * (args.warmup + args.steps))
    ds = Dataset.from_list([{"messages": r["prompt"] + [{"role": "assistant", "content": r["response"]}]}
                            for r in rows])
    n_total = args.warmup + args.steps

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, a, state, control, **kw):
            self.ends.append(time.perf_counter())

    for lmbda in args.lmbdas:
        torch.manual_seed(args.seed)
        student = AutoModelForCausalLM.from_pretrained(args.student_dir, dtype=torch.float32)
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher_dir, dtype=torch.float32)
        with tempfile.TemporaryDirectory() as out:
            cfg = GKDConfig(output_dir=out, per_device_train_batch_size=args.batch, max_steps=n_total,
                            learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.01,
                            max_grad_norm=1.0, logging_steps=10_000, save_strategy="no", report_to="none",
                            use_cpu=True, seed=args.seed, disable_tqdm=True, dataloader_drop_last=True,
                            max_length=MAX_PROMPT + MAX_NEW, max_new_tokens=MAX_NEW, temperature=TEMPERATURE,
                            lmbda=lmbda, beta=BETA, bf16=False, fp16=False,
                            gradient_checkpointing=False)   # a memory saver; off is TRL's fastest
            clock = Clock()
            tr = GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=ds,
                            processing_class=tok, callbacks=[clock])
            tokens: list[int] = []
            inner = tr.compute_loss

            def counting(model, inputs, *a, **kw):
                tokens.append(int(inputs["attention_mask"].sum()))
                return inner(model, inputs, *a, **kw)

            tr.compute_loss = counting
            tr.train()
        ends = clock.ends
        if len(ends) < n_total or len(tokens) < n_total:
            raise RuntimeError(f"TRL ran {len(ends)} steps ({len(tokens)} loss calls), expected {n_total}")
        wall = ends[-1] - ends[args.warmup - 1]
        per_step = [b - a for a, b in zip(ends[args.warmup - 1:], ends[args.warmup:])]
        print("TRL_RESULT " + json.dumps({
            "side": "trl", "lmbda": lmbda, "steps": args.steps, "wall_s": wall,
            "tokens": sum(tokens[args.warmup:]), "step_s_median": statistics.median(per_step),
            "tokens_per_s": sum(tokens[args.warmup:]) / wall, "trl": trl.__version__,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "load": os.getloadavg()[0]}),
            flush=True)


def run_trl(args, assets, lmbdas, threads: int) -> list[dict]:
    cmd = [args.trl_python, os.path.abspath(__file__), "--trl_worker", "--student_dir", assets.student_dir,
           "--teacher_dir", assets.teacher_dir, "--train_file", assets.train_file, "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed),
           "--torch_threads", str(threads), "--lmbdas", *map(str, lmbdas)]
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    res = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("TRL_RESULT ")]
    if proc.returncode or len(res) != len(lmbdas):
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"TRL worker failed (exit {proc.returncode}): {' '.join(cmd)}")
    return res


# ------------------------------------------------------------------------------------- gold_jax half
def gold_config(args, lmbda: float, scheduler: str, run_dir: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location("gold_config", os.path.join(ROOT, "configs", "gold.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.seed, c.run_dir = args.seed, run_dir
    c.demo.cache_dir, c.demo.eval_n = args.cache_dir, 1
    c.gold.lmbda, c.gold.beta, c.gold.temperature = lmbda, BETA, TEMPERATURE
    c.trainer.scheduler = scheduler
    c.trainer.global_batch_size = args.batch
    c.trainer.max_steps = args.warmup + args.steps
    c.trainer.eval_every = c.trainer.log_completions_every = 0
    c.trainer.tensorboard = c.trainer.progress_bar = False
    c.checkpoint.enabled = False
    c.optimizer.lr, c.optimizer.schedule, c.optimizer.warmup_steps = LR, "constant", 0
    return c


def run_gold(args, lmbda: float, scheduler: str) -> dict:
    from gold_jax.trainer import Trainer
    with tempfile.TemporaryDirectory() as run_dir:
        tr = Trainer(gold_config(args, lmbda, scheduler, run_dir))
        try:
            tokens: list[int] = []
            inner = tr.producer.resolve

            def counting(pend):     # called once per trained batch, just before its update
                tokens.append(int(pend.seq.prompt_mask.sum() + pend.seq.completion_mask.sum()))
                return inner(pend)

            tr.producer.resolve = counting
            for _ in range(args.warmup):
                tr.train_one()
            recs, ends, t0 = [], [], time.perf_counter()
            for _ in range(args.steps):
                recs.append(tr.train_one())
                ends.append(time.perf_counter())
        finally:
            tr.close()
    wall = ends[-1] - t0
    per_step = [b - a for a, b in zip([t0] + ends[:-1], ends)]
    mean = lambda k: statistics.fmean(r[k] for r in recs)  # noqa: E731
    return {"side": "gold_jax", "lmbda": lmbda, "scheduler": scheduler, "steps": args.steps, "wall_s": wall,
            "tokens": sum(tokens[args.warmup:]), "tokens_per_s": sum(tokens[args.warmup:]) / wall,
            "step_s_median": statistics.median(per_step), "gen_s": mean("timing/gen"),
            "teacher_s": mean("timing/teacher"), "update_s": mean("timing/update"),
            "on_policy_ratio": recs[-1]["gold/on_policy_ratio"], "load": os.getloadavg()[0]}


# ------------------------------------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache_dir", default="~/.cache/gold_jax/demo")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, caches)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lmbdas", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--trl_python", default=os.path.join(ROOT, ".venv-trl", "bin", "python"))
    ap.add_argument("--no_trl", action="store_true", help="gold_jax only")
    ap.add_argument("--torch_threads", type=int, nargs="+", default=[1, 2],
                    help="TRL is measured with each torch thread count; the ratio uses its fastest")
    # worker mode (inside the TRL virtualenv)
    ap.add_argument("--trl_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--student_dir", help=argparse.SUPPRESS)
    ap.add_argument("--teacher_dir", help=argparse.SUPPRESS)
    ap.add_argument("--train_file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 2 or args.warmup < 1:
        sys.exit("--steps must be >= 2 and --warmup >= 1")
    if args.trl_worker:
        trl_worker(args)
        return

    from absl import logging as absl_logging
    import jax
    from gold_jax.demo.build import ensure_demo_assets
    absl_logging.set_verbosity(absl_logging.WARNING)
    args.cache_dir = os.path.expanduser(args.cache_dir)
    assets = ensure_demo_assets(args.cache_dir)
    if not args.no_trl and not os.path.exists(args.trl_python):
        sys.exit(f"{args.trl_python} not found: create the TRL virtualenv (see this file's docstring) "
                 "or pass --no_trl")
    say(f"demo student {assets.student_dir}, teacher {assets.teacher_dir}; batch {args.batch}, "
        f"{args.warmup} warm-up + {args.steps} timed steps; jax {jax.__version__} on "
        f"{jax.devices()[0].platform} x{len(jax.devices())}, {os.cpu_count()} CPUs; {_load()}")

    res: dict[tuple, dict] = {}
    for lmbda in args.lmbdas:   # interleaved, so both sides see about the same machine load
        for sched in ("sync", "one_step_off"):
            r = run_gold(args, lmbda, sched)
            res[("gold_jax", lmbda, sched)] = r
            say(f"gold_jax lmbda={lmbda:g} {sched:>12}: {r['tokens_per_s']:8.0f} tokens/s, "
                f"{r['wall_s'] / args.steps * 1e3:6.1f} ms/step (median {r['step_s_median'] * 1e3:.1f}; "
                f"gen {r['gen_s'] * 1e3:.1f}, teacher {r['teacher_s'] * 1e3:.1f}, update "
                f"{r['update_s'] * 1e3:.1f} ms), {r['tokens'] / args.steps:.0f} tokens/step, "
                f"on-policy {r['on_policy_ratio']:.2f}; load {r['load']:.2f}")
        for threads in ([] if args.no_trl else args.torch_threads):
            (r,) = run_trl(args, assets, [lmbda], threads)
            best = res.get(("trl", lmbda))
            if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
                res[("trl", lmbda)] = r
            say(f"TRL {r['trl']} GKDTrainer lmbda={lmbda:g}: {r['tokens_per_s']:8.0f} tokens/s, "
                f"{r['wall_s'] / args.steps * 1e3:6.1f} ms/step (median {r['step_s_median'] * 1e3:.1f}), "
                f"{r['tokens'] / args.steps:.0f} tokens/step; torch {r['torch']}, "
                f"{r['torch_threads']} threads; load {r['load']:.2f}")

    say(f"\n## gold_jax vs TRL GKDTrainer: full GOLD step, CPU, batch {args.batch} ({_load()})\n")
    say("| lmbda | gold_jax sync tok/s | gold_jax one_step_off tok/s | TRL tok/s (fastest threads) | sync / TRL | "
        "one_step_off / TRL |")
    say("|---:|---:|---:|---:|---:|---:|")
    for lmbda in args.lmbdas:
        s, o = res[("gold_jax", lmbda, "sync")], res[("gold_jax", lmbda, "one_step_off")]
        t = res.get(("trl", lmbda))
        tt = f"{t['tokens_per_s']:.0f} ({t['torch_threads']})" if t else "–"
        r1 = f"{s['tokens_per_s'] / t['tokens_per_s']:.2f}x" if t else "–"
        r2 = f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}x" if t else "–"
        say(f"| {lmbda:g} | {s['tokens_per_s']:.0f} | {o['tokens_per_s']:.0f} | {tt} | {r1} | {r2} |")
    if 1.0 in args.lmbdas:
        s, o = res[("gold_jax", 1.0, "sync")], res[("gold_jax", 1.0, "one_step_off")]
        say(f"\none_step_off vs sync at lmbda=1 (sync, per step: gen {s['gen_s'] * 1e3:.1f} + teacher "
            f"{s['teacher_s'] * 1e3:.1f} ms to produce a batch, update "
            f"{s['update_s'] * 1e3:.1f} ms per step): step time {o['wall_s'] / args.steps * 1e3:.1f} vs "
            f"{s['wall_s'] / args.steps * 1e3:.1f} ms, one_step_off / sync = {o['wall_s'] / s['wall_s']:.2f} "
            f"(< 1: the overlap pays)")
    say("target: gold_jax >= 1.5x TRL (reported, not asserted)")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "train_bench.md"), "w") as f:
        f.write(f"# benchmarks/train_bench.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n```\n"
                + "\n".join(LINES) + "\n```\n")


if __name__ == "__main__":
    main()

r"""Issue 18: TRL's GKDTrainer at the lmbda ends (0 and 1) on the chain task's assets.

The same student, teacher and parquet as `distill_study.py sweep --task chain`,
the same steps, batch, learning rate, beta and temperature; TRL runs in its own
virtualenv (torch + trl; see benchmarks/train_bench.py) and saves each trained
student, which is then scored here with the project's greedy exact match on the
same held-out prompts. Differences that remain: TRL's loss is the dense JSD
(ours: teacher top-64 + tail), TRL samples on-policy at every step (ours:
one_step_off), TRL's schedule is linear warm-up + cosine to 0 (ours: cosine).
Results are appended to benchmarks/results/distill_study_chain_runs.jsonl
(kind "trl").

    python benchmarks/chain_trl_check.py [--steps 150] [--seeds 0] [--beta 0.5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPERATURE = 0.9


def trl_worker(args) -> None:
    """Runs inside .venv-trl: one GKDTrainer run, the student saved to args.out."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:  # trl < 1.0
        from trl import GKDConfig, GKDTrainer
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(args.student_dir)
    rows = pq.read_table(args.train_file, columns=["prompt", "response"]).slice(0, args.batch * args.steps).to_pylist()
    ds = Dataset.from_list([{"messages": r["prompt"] + [{"role": "assistant", "content": r["response"]}]}
                            for r in rows])
    torch.manual_seed(args.seed)
    student = AutoModelForCausalLM.from_pretrained(args.student_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GKDConfig(output_dir=tmp, per_device_train_batch_size=args.batch, max_steps=args.steps,
                        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=args.warmup_steps,
                        weight_decay=0.01, max_grad_norm=1.0, logging_steps=10_000, save_strategy="no",
                        report_to="none", use_cpu=True, seed=args.seed, disable_tqdm=True,
                        dataloader_drop_last=True, max_length=args.max_length, max_new_tokens=args.max_new,
                        temperature=TEMPERATURE, lmbda=args.lmbda, beta=args.beta, bf16=False, fp16=False,
                        gradient_checkpointing=False)
        tr = GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=ds, processing_class=tok)
        tr.train()
    student.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trl_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--student_dir"), ap.add_argument("--teacher_dir"), ap.add_argument("--train_file")
    ap.add_argument("--out"), ap.add_argument("--lmbda", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max_length", type=int, default=0, help="default: the assets' prompt + response lengths")
    ap.add_argument("--max_new", type=int, default=0, help="default: the assets' response length")
    ap.add_argument("--warmup_steps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--eval_n", type=int, default=256)
    ap.add_argument("--preset", default="full")
    ap.add_argument("--cache_dir", default="~/.cache/gold_jax/demo")
    ap.add_argument("--trl_python", default=os.path.join(ROOT, ".venv-trl", "bin", "python"))
    args = ap.parse_args()
    if args.trl_worker:
        trl_worker(args)
        return
    if not os.path.exists(args.trl_python):
        sys.exit(f"{args.trl_python} not found: create the TRL virtualenv (benchmarks/train_bench.py's docstring)")
    import pyarrow.parquet as pq
    from chain_study import RUNS, _append
    from gold_jax.demo import chain_task
    from gold_jax.data import load_tokenizer
    from gold_jax.demo.build import ensure_demo_assets
    from gold_jax.demo.evaluate import evaluate_accuracy
    from gold_jax.models.hf_io import load_pretrained
    assets = ensure_demo_assets(os.path.expanduser(args.cache_dir), preset=args.preset, task="chain")
    rows = pq.read_table(assets.eval_file).to_pylist()[:args.eval_n]
    tok = load_tokenizer(assets.student_dir)
    lengths = assets.info["data_lengths"]
    max_new = args.max_new or lengths["max_response_length"]
    max_length = args.max_length or lengths["max_prompt_length"] + lengths["max_response_length"]
    for seed in args.seeds:
        for lmbda in (0.0, 1.0):
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                cmd = [args.trl_python, os.path.abspath(__file__), "--trl_worker", "--student_dir",
                       assets.student_dir, "--teacher_dir", assets.teacher_dir, "--train_file", assets.train_file,
                       "--out", out, "--lmbda", str(lmbda), "--beta", str(args.beta), "--seed", str(seed),
                       "--steps", str(args.steps), "--batch", str(args.batch), "--lr", str(args.lr),
                       "--warmup_steps", str(min(10, max(args.steps // 10, 1))),
                       "--max_length", str(max_length), "--max_new", str(max_new)]
                env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
                if proc.returncode:
                    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                    raise RuntimeError(f"TRL worker failed (exit {proc.returncode})")
                wall = time.perf_counter() - t0
                res = evaluate_accuracy(load_pretrained(out, dtype="float32"), tok, rows)
            rec = {"kind": "trl", "lmbda": lmbda, "beta": args.beta, "seed": seed, "acc": res["accuracy"],
                   "well_formed": res["well_formed"], "wall_s": wall, "load_avg": os.getloadavg()[0],
                   "steps": args.steps, "batch": args.batch, "lr": args.lr, "eval_n": args.eval_n,
                   "preset": args.preset, "task_version": chain_task.VERSION}
            _append(RUNS, rec)
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()

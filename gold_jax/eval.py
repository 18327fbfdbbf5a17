r"""Evaluate a run's student: demo runs by exact-match accuracy, other runs by validation JSD.

    python -m gold_jax.eval --run runs/gold               # latest checkpoint of a run
    python -m gold_jax.eval --run runs/gold --step 100 --n 500
    python -m gold_jax.eval --model ~/.cache/gold_jax/demo/full/teacher   # any HF-format folder
    python -m gold_jax.eval --run runs/qwen --n 256       # a real-model run: eval/jsd_loss

A demo run (its student is the embedded demo's) is scored by exact-match
accuracy on the demo task's held-out prompts, taken from the run's own config
(config.demo.cache_dir/preset); --data overrides them with any verl-format
parquet of the demo task. Any other run is scored the way the trainer
validates: the JSD against its teacher (config.teacher.address, else an
embedded one from config.model.teacher_path) on its own config.data.val_files
(--data overrides them); a run without validation files is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import pyarrow.parquet as pq

from gold_jax import cli_errors


def _demo_eval_file(cache_dir: str, preset: str, progress: bool, task: str = "sort") -> str:
    from gold_jax.demo.build import ensure_demo_assets
    return ensure_demo_assets(os.path.expanduser(cache_dir), preset=preset, progress=progress,
                              task=task).eval_file   # issue 18: a chain-task run is scored on the chain task


def load_eval_rows(path: str, n: int | None) -> list[dict[str, Any]]:
    """The first n rows (all with None) of a verl-format parquet file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"eval file {path!r} does not exist")
    rows = pq.read_table(path).to_pylist()
    if not rows:
        raise ValueError(f"eval file {path!r} has no rows")
    return rows if n is None else rows[:n]


def is_demo_run(cfg: Any) -> bool:
    """Whether a run's saved config trained the embedded demo's student (the demo fills the paths in)."""
    student = cfg.get("model", {}).get("student_path", "")
    if not student:
        return True
    demo = cfg.get("demo", {})
    from gold_jax.config import base_config, expand
    root = expand(demo.get("cache_dir", base_config().demo.cache_dir))
    return os.path.abspath(os.path.expanduser(student)).startswith(root.rstrip(os.sep) + os.sep)


DEMO_N = 500   # held-out prompts scored by default on the demo task


def evaluate(*, run: str | None = None, model: str | None = None, step: int | None = None,
             n: int | None = DEMO_N, data: str | None = None, cache_dir: str | None = None,
             preset: str | None = None, batch_size: int = 256, progress: bool = True) -> dict[str, Any]:
    """A demo run or an HF folder: {"accuracy", "well_formed", "n", "eval_file", "source"}.
    Any other run: {"eval/jsd_loss", "n", "tokens", "eval_file", "source"} (see `validation_jsd`)."""
    if (run is None) == (model is None):
        raise ValueError("give exactly one of --run DIR (a training run) or --model HF_DIR")
    if n is not None and n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if step is not None and run is None:
        raise ValueError("--step applies to --run only")
    if run is not None:
        from gold_jax import export
        run_cfg = export.load_run_config(run)
        if not is_demo_run(run_cfg):
            if cache_dir is not None or preset is not None:
                raise ValueError(f"--cache_dir/--preset apply to demo runs only; {run} trained "
                                 f"{run_cfg.model.student_path}")
            from gold_jax.eval_jsd import validation_jsd
            return validation_jsd(run, step=step, n=n, data=data)
    from gold_jax.config import base_config
    from gold_jax.demo.evaluate import evaluate_accuracy
    demo = base_config().demo
    n = DEMO_N if n is None else n
    if run is not None:
        net, tokenizer, cfg = export.load_student(run, step)
        demo = cfg.get("demo", demo)
        source = f"{run} (step {'latest' if step is None else step})"
    else:
        from gold_jax.data import load_tokenizer
        from gold_jax.models.hf_io import load_pretrained
        if not os.path.isdir(model):
            raise FileNotFoundError(f"model folder {model!r} does not exist")
        net, tokenizer, source = load_pretrained(model, dtype="float32"), load_tokenizer(model), model
    if data is None:
        data = _demo_eval_file(cache_dir or demo.cache_dir, preset or demo.get("preset", "full"), progress,
                               demo.get("task", "sort"))
    rows = load_eval_rows(data, n)
    res = evaluate_accuracy(net, tokenizer, rows, batch_size=min(batch_size, len(rows)), progress=progress)
    return {"accuracy": res["accuracy"], "well_formed": res["well_formed"], "n": len(rows),
            "eval_file": data, "source": source}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m gold_jax.eval", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (config.json + checkpoints/)")
    src.add_argument("--model", help="HF-format model folder with its tokenizer")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ap.add_argument("--n", type=int, default=None,
                    help=f"rows to score (default: {DEMO_N} demo prompts; a real-model run: as many as the "
                    "run's own validation (trainer.eval_batches batches))")
    ap.add_argument("--data", default=None, help="eval file (default: the demo's held-out prompts; a real-model "
                    "run: its config.data.val_files)")
    ap.add_argument("--cache_dir", default=None, help="demo cache dir (default: the run's config, else "
                    "the config default)")
    ap.add_argument("--preset", default=None, choices=("full", "tiny"),
                    help="demo preset (default: the run's, else full)")
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    cli_errors.add_verbosity_flag(ap)
    args = ap.parse_args(argv)
    res = cli_errors.run(evaluate, run=args.run, model=args.model, step=args.step, n=args.n, data=args.data,
                         cache_dir=args.cache_dir, preset=args.preset, batch_size=args.batch_size,
                         progress=sys.stderr.isatty(), verbosity=args.verbosity)
    if args.json:
        print(json.dumps(res))
    elif "eval/jsd_loss" in res:
        print(f"validation JSD {res['eval/jsd_loss']:.6f} over {res['tokens']} completion tokens of {res['n']} rows "
              f"of {res['eval_file']} | {res['source']}")
    else:
        print(f"exact-match accuracy {res['accuracy']:.4f} (well-formed {res['well_formed']:.4f}) on "
              f"{res['n']} held-out prompts of {res['eval_file']} | {res['source']}")
    return res


if __name__ == "__main__":
    main()

r"""Exact-match accuracy of a student on the demo task's held-out prompts.

    python -m gold_jax.eval --run runs/gold               # latest checkpoint of a run
    python -m gold_jax.eval --run runs/gold --step 100 --n 500
    python -m gold_jax.eval --model ~/.cache/gold_jax/demo/full/teacher   # any HF-format folder

A run's eval file comes from its own config (config.demo.cache_dir/preset), so
the accuracy is measured on exactly the prompts the run held out; --data
overrides it with any verl-format parquet of the demo task.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import pyarrow.parquet as pq


def _demo_eval_file(cache_dir: str, preset: str, progress: bool) -> str:
    from gold_jax.demo.build import ensure_demo_assets
    return ensure_demo_assets(os.path.expanduser(cache_dir), preset=preset, progress=progress).eval_file


def load_eval_rows(path: str, n: int | None) -> list[dict[str, Any]]:
    """The first n rows (all with None) of a verl-format parquet file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"eval file {path!r} does not exist")
    rows = pq.read_table(path).to_pylist()
    if not rows:
        raise ValueError(f"eval file {path!r} has no rows")
    return rows if n is None else rows[:n]


def evaluate(*, run: str | None = None, model: str | None = None, step: int | None = None,
             n: int | None = 500, data: str | None = None, cache_dir: str | None = None,
             preset: str | None = None, batch_size: int = 256, progress: bool = True) -> dict[str, Any]:
    """{"accuracy", "well_formed", "n", "eval_file", "source"} for a run's checkpoint or an HF folder."""
    if (run is None) == (model is None):
        raise ValueError("give exactly one of --run DIR (a training run) or --model HF_DIR")
    if n is not None and n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if step is not None and run is None:
        raise ValueError("--step applies to --run only")
    from gold_jax.config import base_config
    from gold_jax.demo.evaluate import evaluate_accuracy
    demo = base_config().demo
    if run is not None:
        from gold_jax.export import load_student
        if not os.path.isdir(run):
            raise FileNotFoundError(f"run directory {run!r} does not exist")
        net, tokenizer, cfg = load_student(run, step)
        demo = cfg.get("demo", demo)
        source = f"{run} (step {'latest' if step is None else step})"
    else:
        from gold_jax.data import load_tokenizer
        from gold_jax.models.hf_io import load_pretrained
        if not os.path.isdir(model):
            raise FileNotFoundError(f"model folder {model!r} does not exist")
        net, tokenizer, source = load_pretrained(model, dtype="float32"), load_tokenizer(model), model
    if data is None:
        data = _demo_eval_file(cache_dir or demo.cache_dir, preset or demo.get("preset", "full"), progress)
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
    ap.add_argument("--n", type=int, default=500, help="held-out prompts to score (default 500)")
    ap.add_argument("--data", default=None, help="eval parquet (default: the demo's held-out prompts)")
    ap.add_argument("--cache_dir", default=None, help="demo cache dir (default: the run's config, else "
                    "the config default)")
    ap.add_argument("--preset", default=None, choices=("full", "tiny"),
                    help="demo preset (default: the run's, else full)")
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = ap.parse_args(argv)
    res = evaluate(run=args.run, model=args.model, step=args.step, n=args.n, data=args.data,
                   cache_dir=args.cache_dir, preset=args.preset, batch_size=args.batch_size,
                   progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(res))
    else:
        print(f"exact-match accuracy {res['accuracy']:.4f} (well-formed {res['well_formed']:.4f}) on "
              f"{res['n']} held-out prompts of {res['eval_file']} | {res['source']}")
    return res


if __name__ == "__main__":
    main()

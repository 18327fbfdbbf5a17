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
"""
from __future__ import annotations

import argparse
import os
import sys
import time

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


def main(argv: list[str] | None = None) -> None:
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

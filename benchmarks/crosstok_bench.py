"""Cross-tokenizer distillation (issue 15): alignment speed, its share of a train step, payload per token.

    python benchmarks/crosstok_bench.py [--reps 5] [--steps 8] [--only align|step|payload]

(a) Alignment time per 1k student tokens: `crosstok.align.align` (windowed
    decoding, linear) against `_reference` (the definition it replaced: decode
    every prefix on both sides, then walk the common boundaries; quadratic), on
    the demo's tokenizers (student byte-level BPE 288 vs the cross teacher's
    byte-fallback BPE, demo sorting text) and on a byte-level / byte-fallback
    pair on mixed text (ASCII, CJK, emoji, whitespace runs, chat markers,
    characters split into byte tokens). Both give identical alignments (checked).
(b) Host-side cross-tokenizer work per batch (client: decode and offsets of
    the student rows; server: teacher tokenization, its offsets, alignment,
    top-k moved to student positions), with the teacher forward stubbed out,
    at the demo's sizes (64 rows of the demo's train split, its batch) and at 64 x ~1k
    completion tokens, next to the demo's train step (same-tokenizer demo,
    batch 64, median of the timed steps) measured in the same
    run: the ratio is the overhead alignment adds to a step.
(c) Reply and request bytes per scored token, encoded by teacher/protocol.py:
    cross-tokenizer (text + offsets out; top-k in the teacher vocabulary plus
    span fields back) vs same-tokenizer (ids out; top-k back), top-k 64.

Figures go to benchmarks/results/crosstok_bench.md (rewritten after every
section, so a cut-off run keeps what it measured). Wall times on a shared
2-core CPU move with the load (printed); ratios measured back to back less so.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
OUT = os.path.join(HERE, "results", "crosstok_bench.md")
LINES: list[str] = []
TOP_K = 64
BATCH = 64   # the demo's batch (configs/gold.py)


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)
    with open(OUT, "w") as f:
        f.write("\n".join(LINES) + "\n")


def load() -> str:
    return "%.2f" % os.getloadavg()[0]


def _reference(s_tok, s_ids, t_tok, t_ids):
    """The alignment as first written: every prefix decoded on both sides, the boundary walk (quadratic)."""
    from gold_jax.crosstok.align import _align_offsets_walk, _token_bytes_prefix
    sb, tb = _token_bytes_prefix(s_tok, list(s_ids)), _token_bytes_prefix(t_tok, list(t_ids))
    s_raw, t_raw = sb.text.encode("utf-8"), tb.text.encode("utf-8")
    n = min(len(s_raw), len(t_raw))
    diff = next((i for i in range(n) if s_raw[i] != t_raw[i]), n)
    common = np.intersect1d(sb.ends[sb.ends >= 0], tb.ends[tb.ends >= 0])
    return _align_offsets_walk(sb.ends, tb.ends, common[(common > 0) & (common <= diff)])


def demo_tokenizers():
    """The demo's student tokenizer and the cross teacher's, trained here the way the builds train them."""
    from gold_jax.data.tokenizer import train_tokenizer
    from gold_jax.demo import task
    from gold_jax.demo.cross_build import CROSS_VOCAB, train_teacher_tokenizer
    train, val = task.make_splits(4000, 256, min_len=4, max_len=8, seed=0)
    corpus = task.tokenizer_corpus(train + val)
    return (train_tokenizer(corpus, vocab_size=512),
            train_teacher_tokenizer(corpus + ["user", "assistant"] * 2, CROSS_VOCAB["full"]), train)


def _time(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def align_table(reps: int) -> None:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_crosstok import TEXTS, byte_fallback, byte_level

    from gold_jax.crosstok.align import align, teacher_ids_for
    student, teacher, rows = demo_tokenizers()
    demo_text = "".join(student.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
                        + r["response"] + "<|im_end|>\n" for r in rows[:400])
    cases = [("demo: student BPE-288 vs teacher byte-fallback BPE", student.backend_tokenizer,
              teacher.backend_tokenizer, demo_text),
             ("mixed text: byte-level 300 vs byte-fallback 420", byte_level(300), byte_fallback(420),
              " ".join(TEXTS.values()) * 60)]
    say(f"## (a) Alignment time per 1k student tokens (median of {reps}; reference: 1 run)\n")
    say("| case | student tokens | teacher tokens | fast ms | reference ms | fast ms / 1k | reference ms / 1k "
        "| speed-up | load |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, s_tok, t_tok, text in cases:
        all_ids = s_tok.encode(text, add_special_tokens=False).ids
        for n in (256, 1024, 2200):
            sid = all_ids[:n]
            tid = teacher_ids_for(t_tok, s_tok, sid)
            fast = align(s_tok, sid, t_tok, tid)
            t0 = time.perf_counter()
            ref = _reference(s_tok, sid, t_tok, tid)
            t_ref = time.perf_counter() - t0
            assert fast == ref, f"{name}, {n} tokens: the fast alignment differs from the reference"
            t_fast = _time(lambda: align(s_tok, sid, t_tok, tid), reps)
            say(f"| {name} | {len(sid)} | {len(tid)} | {t_fast * 1e3:.1f} | {t_ref * 1e3:.0f} | "
                f"{t_fast * 1e6 / len(sid):.1f} | {t_ref * 1e6 / len(sid):.0f} | {t_ref / t_fast:.0f}x | {load()} |")
    say("\nBoth paths gave identical spans on every row above (asserted).\n")


class StubBackend:
    """A teacher backend whose score() returns fixed top-k at once (made outside the timing): only the
    host-side cross-tokenizer work is timed."""

    def __init__(self, vocab: int):
        self.vocab, self.made = vocab, {}

    def score(self, ids, mask, *, top_k, temperature, completion_start):
        from gold_jax.types import TeacherScores
        key = (ids.shape[0], ids.shape[1] - completion_start, top_k)
        if key not in self.made:
            b, r, k = key
            rng = np.random.default_rng(0)
            lp = np.sort(-rng.exponential(3.0, (b, r, k)), -1)[..., ::-1] - 1.0
            self.made[key] = TeacherScores(logprobs=lp.astype(np.float32),
                                           ids=rng.integers(0, self.vocab, (b, r, k)).astype(np.int32),
                                           topk_logmass=np.log(np.exp(lp).sum(-1)).astype(np.float32),
                                           token_logprob=lp[..., 0].astype(np.float32))
        return self.made[key]


def demo_batch(student, rows, n: int = 64, repeat: int = 1):
    """A SequenceBatch of n demo rows (prompt + response + EOS); `repeat` answers in one completion (long rows)."""
    from gold_jax.demo.sft import encode_rows
    rows = [dict(r, response=" ".join([r["response"]] * repeat)) for r in rows[:n]]
    return encode_rows(student, rows)


def host_work(student, teacher, seq, reps: int, *, reference: bool = False) -> tuple[float, dict]:
    """Seconds of cross-tokenizer work for one batch: the client's request arrays (decode, offsets) plus the
    server's score_rows (teacher tokenization, its offsets, alignment, fields) with the forward stubbed.
    The wire encoding is left out (the same-tokenizer path encodes its request and reply too)."""
    from gold_jax.crosstok import request as R
    from gold_jax.teacher import protocol as P
    backend = StubBackend(len(teacher))
    eos = [student.eos_token_id]
    saved = R.token_bytes
    if reference:
        from gold_jax.crosstok.align import _token_bytes_prefix
        R.token_bytes = lambda tok, ids: _token_bytes_prefix(tok, [int(i) for i in ids])
    try:
        def client():
            return R.student_request(student, seq.prompt_ids, seq.prompt_mask, seq.completion_ids,
                                     seq.completion_mask, eos_ids=eos)
        arrays = client()
        msg = P.decode(P.encode_request("x" * 32, "score", {"top_k": TOP_K, "temperature": 1.0, "signal": "cross"},
                                        arrays))
        args = P._cross_score(msg, {"cross_tokenizer": True, "max_top_k": 1024, "vocab_size": len(teacher)})

        def server():
            return R.score_rows(backend, teacher, args["pieces"], args["student_ends"], top_k=TOP_K,
                                temperature=1.0, strategy="observed", skip_teacher_eos=True,
                                eos_ids=[teacher.eos_token_id], max_length=1 << 16)
        reply = server()
        return _time(lambda: (client(), server()), reps), {"request": arrays, "reply": reply}
    finally:
        R.token_bytes = saved


def host_work_pair(student, teacher, seq, reps: int) -> tuple[float, float]:
    """(fast, reference) medians, measured alternately so that a load spike hits both alike."""
    fast, ref = [], []
    for _ in range(reps):
        fast.append(host_work(student, teacher, seq, 1)[0])
        ref.append(host_work(student, teacher, seq, 1, reference=True)[0])
    return statistics.median(fast), statistics.median(ref)


def train_step_s(steps: int, warmup: int) -> dict:
    """The same-tokenizer demo's train step (configs/gold.py's batch), median of timed steps."""
    import types

    import train_bench
    args = types.SimpleNamespace(seed=0, cache_dir="~/.cache/gold_jax/demo", batch=BATCH, warmup=warmup, steps=steps)
    return train_bench.run_gold(args, 0.5, "one_step_off")


def step_table(reps: int, steps: int, warmup: int) -> None:
    student, teacher, rows = demo_tokenizers()
    short, long = demo_batch(student, rows), demo_batch(student, rows, repeat=150)
    n_short, n_long = int(short.completion_mask.sum()), int(long.completion_mask.sum())
    say(f"## (b) Alignment work per batch vs a train step ({BATCH} rows; teacher forward stubbed; fast and "
        f"reference alternately, median of {reps}, 2 for the long batch)\n")
    say("| batch | scored student tokens | fast ms | reference ms | load |")
    say("|---|---:|---:|---:|---:|")
    results = {}
    for name, seq, n in (("demo (prompt <= 32, completion <= 16)", short, n_short),
                         ("long (completion ~1k tokens a row)", long, n_long)):
        t_fast, t_ref = host_work_pair(student, teacher, seq, reps if n < 2000 else 2)
        results[name] = (t_fast, t_ref)
        say(f"| {name} | {n} | {t_fast * 1e3:.1f} | {t_ref * 1e3:.0f} | {load()} |")
    sys.path.insert(0, HERE)
    r = train_step_s(steps, warmup)
    step = r["step_s_median"]
    t_fast, t_ref = results["demo (prompt <= 32, completion <= 16)"]
    say(f"\nDemo train step (train_bench.run_gold: the demo models, one_step_off, lmbda 0.5, batch {BATCH}, "
        f"median of {steps} steps after {warmup}): {step * 1e3:.0f} ms (load {r['load']:.2f}).")
    say(f"Alignment per demo batch / train step: {t_fast / step:.3f} (fast), {t_ref / step:.3f} (reference).\n")


def payload_table() -> None:
    from gold_jax.teacher import protocol as P
    from gold_jax.types import TeacherScores
    student, teacher, rows = demo_tokenizers()
    seq = demo_batch(student, rows)
    _, cross = host_work(student, teacher, seq, 1)
    b, r = seq.completion_ids.shape
    scored = int(cross["reply"]["scored"].sum())
    real = int(seq.completion_mask.sum())

    def nbytes(frames) -> int:
        return sum(len(memoryview(f)) for f in frames)
    cross_req = nbytes(P.encode_request("x" * 32, "score", {"top_k": TOP_K, "temperature": 1.0, "signal": "cross",
                                                             "strategy": "observed", "skip_teacher_eos": True},
                                        cross["request"]))
    cross_rep = nbytes(P.encode_reply("x" * 32, arrays={k: cross["reply"][k] for k in P.CROSS_REPLY}))
    same_req = nbytes(P.encode_request("x" * 32, "score", {"top_k": TOP_K, "temperature": 1.0,
                                                            "completion_start": seq.completion_start},
                                       {"input_ids": seq.input_ids, "attention_mask": seq.attention_mask}))
    rng = np.random.default_rng(0)
    same = TeacherScores(logprobs=rng.normal(size=(b, r, TOP_K)).astype(np.float32),
                         ids=rng.integers(0, len(student), (b, r, TOP_K)).astype(np.int32),
                         topk_logmass=np.zeros((b, r), np.float32), token_logprob=np.zeros((b, r), np.float32))
    same_rep = nbytes(P.encode_reply("x" * 32, arrays=P.scores_to_arrays(same)))
    say(f"## (c) Bytes on the wire per completion token (demo batch {b} x {r} completion positions, "
        f"{real} real completion tokens, top-k {TOP_K})\n")
    say("| | request bytes | reply bytes | reply bytes / completion position | request bytes / real completion token |")
    say("|---|---:|---:|---:|---:|")
    for name, req, rep in (("same tokenizer (ids out, top-k back)", same_req, same_rep),
                           ("cross tokenizer (text out, aligned top-k back)", cross_req, cross_rep)):
        say(f"| {name} | {req} | {rep} | {rep / (b * r):.0f} | {req / real:.1f} |")
    say(f"\nCross / same reply: {cross_rep / same_rep:.2f}x. Per position the cross reply adds the span fields "
        f"(log-scale, span id, span base, loss mask: 16 bytes) to the top-k's {8 * TOP_K + 4} bytes and drops the "
        f"actual token's log-prob (4); {scored} of {real} real completion tokens were scored (student EOS skipped). "
        "The teacher's id -> string map travels once per run (`vocab` op), not per request.\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("align", "step", "payload"), default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    say("# Cross-tokenizer benchmark (benchmarks/crosstok_bench.py)\n")
    say(f"`python benchmarks/crosstok_bench.py{' --only ' + args.only if args.only else ''}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, load at start {load()}\n")
    if args.only in (None, "align"):
        align_table(args.reps)
    if args.only in (None, "payload"):
        payload_table()
    if args.only in (None, "step"):
        step_table(args.reps, args.steps, args.warmup)


if __name__ == "__main__":
    main()

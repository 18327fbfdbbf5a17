"""Check a running teacher server from the shell: ping, info, optional tokenizer check and test score.

Used by launch/start_teacher.sh to wait until the server answers, and by hand
to verify one before a run points `teacher.address` at it:

    python -m gold_jax.teacher.status --address tcp://127.0.0.1:15555 \
        [--wait 300] [--workers 2] [--tokenizer STUDENT_DIR] [--score]

Exit status 0 when every check passed; otherwise one line `error: <reason>` and
status 2 (the traceback with --verbosity=1 or GOLD_JAX_TRACEBACK=1).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from gold_jax import cli_errors
from gold_jax.teacher.client import TeacherClient, TeacherError
from gold_jax.types import SequenceBatch


def wait_ready(client: TeacherClient, *, workers: int, wait_s: float) -> dict:
    """Ping until the server answers with at least `workers` workers (TimeoutError after wait_s)."""
    deadline = time.monotonic() + wait_s
    last: object = "no answer"
    while True:
        try:
            pong = client.ping()
            if pong.get("workers", 0) >= workers:
                return pong
            last = f"{pong.get('workers', 0)} of {workers} workers registered"
        except TimeoutError as e:
            last = e
        if time.monotonic() > deadline:
            raise TimeoutError(f"teacher at {client.address} not ready after {wait_s:g}s: {last}")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gold_jax.teacher.status", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default="tcp://127.0.0.1:15555")
    ap.add_argument("--wait", type=float, default=0.0, help="seconds to keep pinging before giving up")
    ap.add_argument("--workers", type=int, default=1, help="workers that must be registered")
    ap.add_argument("--tokenizer", default="", help="student tokenizer dir: check the fingerprint")
    ap.add_argument("--score", action="store_true", help="score one short sequence (top-k 8)")
    cli_errors.add_verbosity_flag(ap)
    args = ap.parse_args(argv)
    return cli_errors.run(check, args, verbosity=args.verbosity)


def check(args: argparse.Namespace) -> int:
    """Run the checks that `args` ask for; UserError names the first that failed."""
    try:
        with TeacherClient(args.address, timeout_s=2.0, max_retries=0) as c:
            pong = wait_ready(c, workers=args.workers, wait_s=args.wait)
        # Real requests may wait for a first jit compile: give them a longer timeout.
        with TeacherClient(args.address, timeout_s=300.0, max_retries=1) as c:
            info = c.info()
            print(f"teacher at {args.address}: {pong['workers']} worker(s)")
            print(json.dumps(info, indent=1))
            if args.tokenizer:
                from gold_jax.data import load_tokenizer
                from gold_jax.fingerprint import tokenizer_fingerprint, tokenizer_size
                tok = load_tokenizer(args.tokenizer)
                c.check_student(tokenizer_size(tok), tokenizer_fingerprint(tok))
                print(f"tokenizer {args.tokenizer}: fingerprint matches")
            if args.score:
                ids = (np.arange(16, dtype=np.int32).reshape(2, 8) * 7) % info["vocab_size"]
                one = np.ones_like(ids)
                t0 = time.perf_counter()
                s = c.score(SequenceBatch(ids[:, :4], one[:, :4], ids[:, 4:], one[:, 4:]), top_k=min(
                    8, info["max_top_k"]), temperature=1.0).result(600)
                print(f"score ok in {time.perf_counter() - t0:.2f}s: top-k ids {s.ids[0, 0].tolist()}, "
                      f"log-mass {float(s.topk_logmass[0, 0]):.4f}")
    except (TimeoutError, ConnectionError, ValueError, TeacherError) as e:
        raise cli_errors.UserError(f"teacher check failed: {e}") from e
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Teacher server round-trip overhead vs calling the jax backend in-process, as a ratio from one run.

Teacher: random-weight decoder, 8 layers, hidden 512, vocab 32000. Request: a
batch of 8 x 512 tokens (prompt 256 + completion 256 scored), top-k 64.

  direct    backend.score(...) in this process (device compute + copy to host)
  service   TeacherClient.score(...) over tcp://127.0.0.1 to a server process whose
            worker is another process (same weights): the deployment of
            launch/start_teacher.sh, trainer, server and worker each on their own
  embedded  server and worker as threads of this process, client over inproc://
            (the trainer's embedded teacher); split into client -> worker,
            backend.score in the worker, worker -> client
  pipelined service with 4 requests in flight, as the trainer's futures keep them:
            the worker prefetches the next task, so transport overlaps compute
  stub      in-process round trip over tcp with a backend that returns a fixed
            answer: the transport's own cost, without the noise of the compute

Direct, service and embedded calls alternate so that a busy machine slows all
alike; medians are reported. Target: server / direct - 1 < 10%.

    python benchmarks/teacher_bench.py [--reps 5] [--batch 8] [--length 512] [--top-k 64]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

# Two processes (this one and the worker) share one accelerator: no up-front grab of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from gold_jax.models.config import ModelConfig  # noqa: E402
from gold_jax.models.decoder import Decoder  # noqa: E402
from gold_jax.teacher import TeacherClient, start_local_teacher  # noqa: E402
from gold_jax.teacher import protocol as P  # noqa: E402
from gold_jax.teacher.backends.base import TeacherBackend  # noqa: E402
from gold_jax.teacher.backends.jax_backend import JaxBackend  # noqa: E402
from gold_jax.teacher.status import wait_ready  # noqa: E402
from gold_jax.teacher.worker import serve_worker  # noqa: E402
from gold_jax.types import SequenceBatch  # noqa: E402


class _Vocab:
    """Tokenizer stand-in (random weights need no real tokenizer): ids, eos and pad."""

    def __init__(self, n: int):
        self.n, self.eos_token_id, self.pad_token_id, self.special_tokens_map = n, 1, 0, {}

    def get_vocab(self) -> dict[str, int]:
        return {f"<{i}>": i for i in range(self.n)}


class _Stub(TeacherBackend):
    """Answers every score request with a fixed result: the transport alone."""

    def __init__(self, info: dict, scores):
        self._info, self._scores = info, scores

    def info(self):
        return dict(self._info)

    def score(self, input_ids, attention_mask, *, top_k, temperature, completion_start):
        return self._scores

    def generate(self, *a, **k):
        raise NotImplementedError


class _Timed(TeacherBackend):
    """Delegates to a backend and records when each score call starts and ends (same clock as the bench)."""

    def __init__(self, inner: TeacherBackend):
        self.inner, self.spans = inner, []

    def info(self):
        return self.inner.info()

    def score(self, *a, **kw):
        t0 = time.perf_counter()
        out = self.inner.score(*a, **kw)
        self.spans.append((t0, time.perf_counter()))
        return out

    def generate(self, *a, **kw):
        return self.inner.generate(*a, **kw)


def _split(fn, timed: _Timed) -> tuple[float, float, float, float]:
    """(total, inbound, compute in the worker, outbound) of one served call."""
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    s0, s1 = timed.spans[-1]
    return t1 - t0, s0 - t0, s1 - s0, t1 - s1


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make_backend(length: int) -> JaxBackend:
    """The benchmark teacher; seed 0, so the worker process builds the same weights."""
    cfg = ModelConfig(architecture="llama", vocab_size=32000, hidden_size=512, intermediate_size=1536,
                      num_layers=8, num_heads=8, num_kv_heads=8, head_dim=64, max_position_embeddings=length)
    return JaxBackend(Decoder(cfg, rngs=nnx.Rngs(0)), _Vocab(32000), model_name="bench-8x512")


def _free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def start_service(length: int) -> tuple[str, list[subprocess.Popen]]:
    """Server process (no batching across requests) + one worker process; returns the client address."""
    port, wport = _free_port(), _free_port()
    server = subprocess.Popen([sys.executable, "-m", "gold_jax.teacher", "--model", "-", "--workers", "0",
                               "--port", str(port), "--worker-port", str(wport), "--heartbeat-timeout", "600",
                               "--max-batch-requests", "1"], stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-worker",
                               f"tcp://127.0.0.1:{wport}", "--length", str(length)], stderr=subprocess.DEVNULL)
    return f"tcp://127.0.0.1:{port}", [server, worker]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--stub-reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=256, help="prompt part of the length (not scored)")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--switch-interval", type=float, default=0.0,
                    help="sys.setswitchinterval (s) for this run; 0 keeps Python's default (5 ms)")
    ap.add_argument("--serve-worker", default="", help=argparse.SUPPRESS)  # internal: be the worker process
    args = ap.parse_args()
    if args.switch_interval > 0:
        sys.setswitchinterval(args.switch_interval)
    b, length, p, k = args.batch, args.length, args.prompt, args.top_k
    backend = make_backend(length)
    if args.serve_worker:
        return serve_worker(backend, args.serve_worker, heartbeat_s=0.5)
    rng = np.random.default_rng(0)
    batch = SequenceBatch(rng.integers(0, 32000, (b, p), dtype=np.int32), np.ones((b, p), np.int32),
                          rng.integers(0, 32000, (b, length - p), dtype=np.int32),
                          np.ones((b, length - p), np.int32))
    ids, mask = batch.input_ids, batch.attention_mask

    def direct():
        return backend.score(ids, mask, top_k=k, temperature=1.0, completion_start=p)

    ref = direct()  # compile
    req = P.encode_request("x" * 32, "score", {"top_k": k, "temperature": 1.0, "completion_start": p},
                           {"input_ids": ids, "attention_mask": mask})
    rep = P.encode_reply("x" * 32, arrays=P.scores_to_arrays(ref))
    req_bytes, rep_bytes = (sum(len(memoryview(f)) for f in fr) for fr in (req, rep))
    scored = b * (length - p)

    address, procs = start_service(length)
    embedded = _Timed(backend)
    parts = []
    try:
        with start_local_teacher(None, backend=embedded, heartbeat_timeout_s=600.0) as t_in, \
                TeacherClient(address, timeout_s=600.0, max_retries=0) as c_svc, \
                TeacherClient(t_in.address, timeout_s=600.0, max_retries=0) as c_in:
            wait_ready(c_svc, workers=1, wait_s=600)
            modes = {"direct": direct,
                     "service": lambda: c_svc.score(batch, top_k=k, temperature=1.0).result(),
                     "embedded": lambda: c_in.score(batch, top_k=k, temperature=1.0).result()}
            for name in ("service", "embedded"):
                np.testing.assert_array_equal(modes[name]().ids, ref.ids)  # warm-up and a correctness check
            times = {name: [] for name in modes}
            order = list(modes)
            for i in range(args.reps):  # rotating order: a drifting machine load hits every mode alike
                for name in order[i % 3:] + order[:i % 3]:
                    if name == "embedded":
                        parts.append(_split(modes[name], embedded))
                        times[name].append(parts[-1][0])
                    else:
                        times[name].append(_time(modes[name]))
            # The trainer keeps several requests in flight; the worker prefetches the next task.
            n_pipe = 4 * args.reps
            t0 = time.perf_counter()
            futs = [c_svc.score(batch, top_k=k, temperature=1.0) for _ in range(n_pipe)]
            for f in futs:
                f.result()
            t_pipe = (time.perf_counter() - t0) / n_pipe
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    stub = _Stub(backend.info(), ref)
    with start_local_teacher(None, backend=stub, inproc=False) as t:
        with TeacherClient(t.address, timeout_s=60.0, max_retries=0) as c:
            stub_call = lambda: c.score(batch, top_k=k, temperature=1.0).result()  # noqa: E731
            stub_call()
            t_stub = [_time(stub_call) for _ in range(args.stub_reps)]

    med = {name: statistics.median(x) for name, x in times.items()}
    md, mt = med["direct"], statistics.median(t_stub)
    print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}); teacher 8 layers, hidden 512, "
          f"vocab 32000; batch {b} x {length} tokens ({scored} scored), top-k {k}; "
          f"switch interval {1e3 * sys.getswitchinterval():g} ms")
    labels = {"direct": "direct (in-process backend.score)",
              "service": "service (server + worker processes, tcp)",
              "embedded": "embedded (threads, client over inproc)"}
    for name, label in labels.items():
        print(f"{label:<42} median {1e3 * med[name]:8.1f} ms over {args.reps} "
              f"[{', '.join(f'{1e3 * x:.1f}' for x in times[name])}]")
    for name in ("service", "embedded"):
        print(f"{name:>9}: server / direct = {med[name] / md:.3f}  => overhead "
              f"{100 * (med[name] / md - 1):+.1f}% (target < 10%)")
    print(f"pipelined: service with 4 requests in flight: {1e3 * t_pipe:.1f} ms per request over {n_pipe} "
          f"=> server / direct = {t_pipe / md:.3f}, overhead {100 * (t_pipe / md - 1):+.1f}%")
    _, inb, comp, outb = (1e3 * statistics.median(x) for x in zip(*parts))
    print(f" embedded parts (medians): client -> worker {inb:.2f} ms, backend.score in the worker {comp:.2f} ms, "
          f"worker -> client {outb:.2f} ms")
    print(f"transport alone, in-process over tcp (stub backend, no compute): median {1e3 * mt:.2f} ms over "
          f"{args.stub_reps} = {100 * mt / md:.1f}% of a direct call")
    print(f"payload: request {req_bytes:,} B ({req_bytes / (b * length):.1f} B per input token), "
          f"reply {rep_bytes:,} B ({rep_bytes / scored:.1f} B per scored token: {k} x (f32 + i32) + "
          f"log-mass + token logprob), total {(req_bytes + rep_bytes) / scored:.1f} B per scored token")


if __name__ == "__main__":
    main()

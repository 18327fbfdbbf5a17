"""Command line of `python -m gold_jax.teacher.server`: the broker plus N local worker processes.

Local workers are children of the server, so stopping the server (SIGTERM,
Ctrl-C) stops them. A watcher notices workers that die: their exit code is
logged, and if every one of them dies before any registered (a bad model path,
out of memory) the server exits with status 1 instead of waiting forever.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from gold_jax.teacher import server as server_mod

log = logging.getLogger("gold_jax.teacher.server")


def _watch(server: server_mod.TeacherServer, procs: list[subprocess.Popen], failed: threading.Event) -> None:
    reported: set[int] = set()
    while not server._stop.is_set():
        for i, p in enumerate(procs):
            if i not in reported and p.poll() is not None:
                reported.add(i)
                log.error("local worker %d (pid %d) exited with code %s", i, p.pid, p.returncode)
        if procs and len(reported) == len(procs) and not server.workers:
            log.error("all %d local workers exited and none is registered; stopping the server", len(procs))
            failed.set()
            server.stop()
            return
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m gold_jax.teacher.server", description=server_mod.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF-format folder (weights + tokenizer)")
    ap.add_argument("--backend", default="jax", choices=("jax", "vllm"))
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 opens it to the network")
    ap.add_argument("--port", type=int, default=15555)
    ap.add_argument("--worker-port", type=int, default=15556)
    ap.add_argument("--workers", type=int, default=1, help="local worker processes to start (0: none)")
    ap.add_argument("--heartbeat-timeout", type=float, default=10.0)
    ap.add_argument("--max-batch-requests", type=int, default=16, help="score requests merged into one call")
    ap.add_argument("--max-batch-tokens", type=int, default=1 << 16, help="token budget of a merged call")
    args = ap.parse_args(argv)
    if args.workers < 0:
        ap.error(f"--workers must be >= 0, got {args.workers}")
    if args.workers and not os.path.isdir(args.model):
        ap.error(f"--model {args.model!r} is not a directory")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = server_mod.TeacherServer(args.host, args.port, args.worker_port,
                                      heartbeat_timeout_s=args.heartbeat_timeout,
                                      max_batch_requests=args.max_batch_requests,
                                      max_batch_tokens=args.max_batch_tokens)
    # Local workers use an ipc:// socket in a private (0700) directory: no TCP stack on the
    # path of the ~0.5 kB/token replies; remote workers use --worker-port.
    ipc_dir = tempfile.mkdtemp(prefix="gold_jax_teacher_")
    local = f"ipc://{ipc_dir}/back.sock"
    server.back.bind(local)
    procs = [subprocess.Popen([sys.executable, "-m", "gold_jax.teacher.worker", "--model", args.model,
                               "--backend", args.backend, "--connect", local, "--exit-with-parent"])
             for _ in range(args.workers)]
    failed = threading.Event()
    threading.Thread(target=_watch, args=(server, procs, failed), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    log.info("teacher server on %s, workers connect to %s", server.address, server.worker_address)
    try:
        server.serve()
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(ipc_dir, ignore_errors=True)
        os._exit(1 if failed.is_set() else 0)

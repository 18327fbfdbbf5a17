"""Command line of the teacher server (`python -m gold_jax.teacher`): the broker plus N local worker processes.

Local workers are children of the server, so stopping the server (SIGTERM,
Ctrl-C) stops them. A watcher notices workers that die: their exit code is
logged, and if every one of them dies before any registered (a bad model path,
out of memory) the server stops. The exit status says why the server stopped,
and the log names the cause: 0 never happens by accident; 1 for a failure
(the loop crashed, all workers died), 128+N after signal N, 2 for a usage error.
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

from gold_jax import cli_errors
from gold_jax.teacher import server as server_mod
from gold_jax.teacher.backends import BACKENDS, TEACHER_DTYPES

log = logging.getLogger("gold_jax.teacher.server")


def _watch(server: server_mod.TeacherServer, procs: list[subprocess.Popen], failed: threading.Event) -> None:
    reported: set[int] = set()
    while not server.stopping:
        for i, p in enumerate(procs):
            if i not in reported and p.poll() is not None:
                reported.add(i)
                log.error("local worker %d (pid %d) exited with code %s", i, p.pid, p.returncode)
        if procs and len(reported) == len(procs) and not server.workers:
            failed.set()
            server.stop(f"all {len(procs)} local workers exited and none is registered")
            return
        time.sleep(1.0)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m gold_jax.teacher", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF-format folder (weights + tokenizer)")
    ap.add_argument("--backend", default="jax", choices=BACKENDS)
    ap.add_argument("--dtype", default="auto", choices=TEACHER_DTYPES,
                    help="teacher compute dtype; auto = bfloat16 on accelerators, float32 on CPU")
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 opens it to the network")
    ap.add_argument("--port", type=int, default=15555)
    ap.add_argument("--worker-port", type=int, default=15556)
    ap.add_argument("--workers", type=int, default=1, help="local worker processes to start (0: none)")
    ap.add_argument("--heartbeat-timeout", type=float, default=10.0)
    ap.add_argument("--max-batch-requests", type=int, default=16, help="score requests merged into one call")
    ap.add_argument("--max-batch-tokens", type=int, default=1 << 16, help="token budget of a merged call")
    cli_errors.add_verbosity_flag(ap)
    return ap


def serve(args: argparse.Namespace) -> int:
    """Run the server until it stops; returns the exit status (the cause is in the log)."""
    if args.workers < 0:
        raise cli_errors.UserError(f"--workers must be >= 0, got {args.workers}")
    if args.workers and not os.path.isdir(args.model):
        raise cli_errors.UserError(f"--model {args.model!r} is not a directory")
    try:
        server = server_mod.TeacherServer(args.host, args.port, args.worker_port,
                                          heartbeat_timeout_s=args.heartbeat_timeout,
                                          max_batch_requests=args.max_batch_requests,
                                          max_batch_tokens=args.max_batch_tokens)
    except Exception as e:  # zmq.ZMQError: address in use, bad host
        raise cli_errors.UserError(f"cannot bind {args.host} ports {args.port}/{args.worker_port}: {e}") from e
    # Local workers use an ipc:// socket in a private (0700) directory: no TCP stack on the
    # path of the ~0.5 kB/token replies; remote workers use --worker-port.
    ipc_dir = tempfile.mkdtemp(prefix="gold_jax_teacher_")
    local = f"ipc://{ipc_dir}/back.sock"
    server.bind(local)
    procs = [subprocess.Popen([sys.executable, "-m", "gold_jax.teacher.worker", "--model", args.model,
                               "--backend", args.backend, "--dtype", args.dtype, "--connect", local,
                               "--exit-with-parent"])
             for _ in range(args.workers)]
    failed = threading.Event()
    threading.Thread(target=_watch, args=(server, procs, failed), daemon=True).start()
    got_signal: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        got_signal.append(signum)
        server.stop(f"received {signal.Signals(signum).name}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("teacher server on %s, workers connect to %s", server.address, server.worker_address)
    status = 1
    try:
        server.serve()
        status = 128 + got_signal[0] if got_signal else 1
    except BaseException as e:  # noqa: BLE001 - logged by serve(); the status says it failed
        server.stop_cause = server.stop_cause or f"{type(e).__name__}: {e}"
    finally:
        log.log(logging.INFO if got_signal else logging.ERROR, "teacher server stopped (exit status %d): %s",
                status, server.stop_cause or "unknown cause")
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(ipc_dir, ignore_errors=True)
    return status


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    status = cli_errors.run(serve, args, verbosity=args.verbosity)
    logging.shutdown()
    # os._exit: no interpreter teardown racing the ZeroMQ threads of a stopped server.
    os._exit(status)

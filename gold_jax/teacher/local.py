"""An embedded teacher for runs where `teacher.address` is empty.

In process: server and worker run as threads of the trainer (the backend's
jit programs share the process's devices). Otherwise: `python -m
gold_jax.teacher.server` as a child process that is stopped by `close()`.
Either way the trainer talks to it through the same TeacherClient.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from typing import Any

from gold_jax.teacher.backends.base import TeacherBackend


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalTeacher:
    """Handle on an embedded teacher: `.address` for TeacherClient, `.close()` to stop it."""

    def __init__(self, address: str, *, server: Any = None, threads: list | None = None,
                 stops: list | None = None, process: subprocess.Popen | None = None):
        self.address, self.server, self.process = address, server, process
        self._threads, self._stops = threads or [], stops or []

    def close(self) -> None:
        for ev in self._stops:
            ev.set()
        if self.server is not None:
            self.server.stop()
        for t in self._threads:
            t.join(timeout=10)
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def __enter__(self) -> LocalTeacher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def start_local_teacher(model_path: str | None, *, backend: str | TeacherBackend = "jax", port: int = 0,
                        workers: int = 1, in_process: bool = True, ready_timeout_s: float = 300.0,
                        inproc: bool = True, dtype: str = "auto", **server_kw: Any) -> LocalTeacher:
    """Start server + `workers` workers on 127.0.0.1 (port 0 picks free ports).

    In process, `.address` is an inproc:// endpoint (for clients in this process) unless
    `inproc=False`; the TCP port is open either way (`.server.address`).

    `backend` is a kind ("jax", "vllm") built from `model_path`, or, in process,
    an already built TeacherBackend object shared by the worker threads. `dtype` (auto,
    float32, bfloat16, float16) is the teacher's weight and compute dtype (config teacher.dtype).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if in_process:
        from gold_jax.teacher.backends import make_backend
        from gold_jax.teacher.server import TeacherServer
        from gold_jax.teacher.worker import serve_worker
        server = TeacherServer("127.0.0.1", port, 0, **server_kw)
        threads, stops = [server.start_thread()], []
        be = backend if isinstance(backend, TeacherBackend) else make_backend(backend, model_path, dtype=dtype)
        for i in range(workers):
            stop = threading.Event()
            t = threading.Thread(target=serve_worker, args=(be, server.inproc_worker_address), kwargs={"stop": stop},
                                 name=f"teacher-worker-{i}", daemon=True)
            t.start()
            threads.append(t)
            stops.append(stop)
        # The trainer shares this process (and ZeroMQ context): inproc skips TCP and copies.
        address = server.inproc_address if inproc else server.address
        return LocalTeacher(address, server=server, threads=threads, stops=stops)
    if not isinstance(backend, str):
        raise TypeError("a subprocess teacher needs backend as a kind string ('jax' or 'vllm')")
    port = port or _free_port()
    cmd = [sys.executable, "-m", "gold_jax.teacher", "--model", str(model_path), "--backend", backend,
           "--dtype", dtype, "--port", str(port), "--worker-port", str(_free_port()), "--workers", str(workers)]
    proc = subprocess.Popen(cmd)
    local = LocalTeacher(f"tcp://127.0.0.1:{port}", process=proc)
    from gold_jax.teacher.client import TeacherClient
    deadline = time.monotonic() + ready_timeout_s
    with TeacherClient(local.address, timeout_s=2.0, max_retries=0) as c:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"teacher server exited with code {proc.returncode}: {' '.join(cmd)}")
            try:
                if c.ping().get("workers", 0) >= workers:
                    return local
            except TimeoutError:
                pass
            if time.monotonic() > deadline:
                local.close()
                raise TimeoutError(f"local teacher at {local.address} not ready in {ready_timeout_s}s")
            time.sleep(0.2)

"""Teacher server: a ZeroMQ broker between trainer clients and backend workers.

Clients (DEALER) talk to the front ROUTER; workers (DEALER, in this process,
other processes or other hosts) connect to the back ROUTER, register with
their info and send heartbeats. The broker validates every request, batches
compatible score requests into one worker task, remembers which request runs
on which worker and puts it back in the queue when that worker stops
heartbeating. Request ids make retries idempotent: a retried id that is queued
or running just gains a waiter; a finished one gets its cached reply again.

The messages themselves (and their checks) live in protocol.py; the command
line (worker processes, signals, exit status) in cli.py:

    python -m gold_jax.teacher --model PATH [--backend jax] [--dtype auto] [--host 127.0.0.1]
        [--port 15555] [--worker-port 15556] [--workers N]
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from typing import Any

import zmq

from gold_jax.teacher import protocol as P
from gold_jax.teacher.backends.base import check_info

log = logging.getLogger("gold_jax.teacher.server")


@dataclasses.dataclass
class _Task:
    rid: str
    op: str
    frames: list                 # the client's message, forwarded to the worker as is
    key: tuple | None            # score requests with equal keys can share one backend call
    tokens: int
    waiters: set = dataclasses.field(default_factory=set)   # client identities


@dataclasses.dataclass
class _Worker:
    info: dict
    last_seen: float
    tasks: list = dataclasses.field(default_factory=list)   # request-id sets of the tasks it holds

    @property
    def running(self) -> set:
        return set().union(*self.tasks)


class TeacherServer:
    """Front (clients) + back (workers) sockets and the dispatch loop; `serve()` blocks."""

    def __init__(self, host: str = "127.0.0.1", port: int = 15555, worker_port: int = 15556, *,
                 heartbeat_timeout_s: float = 5.0, max_batch_tokens: int = 1 << 16,
                 max_batch_requests: int = 16, max_message_bytes: int = P.MAX_MESSAGE_BYTES,
                 cache_entries: int = 64, cache_bytes: int = 512 << 20, max_queue: int = 1024,
                 worker_prefetch: int = 2):
        self.ctx = zmq.Context.instance()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.back = self.ctx.socket(zmq.ROUTER)
        for s in (self.front, self.back):
            s.setsockopt(zmq.LINGER, 0)
        # Hard cap in libzmq (drops the connection); the softer limit below gets an error reply.
        self.front.setsockopt(zmq.MAXMSGSIZE, 4 * max_message_bytes + (1 << 20))
        self.port = self._bind_port(self.front, host, port)
        self.worker_port = self._bind_port(self.back, host, worker_port)
        self.address = f"tcp://{'127.0.0.1' if host in ('0.0.0.0', '*') else host}:{self.port}"
        self.worker_address = f"tcp://{'127.0.0.1' if host in ('0.0.0.0', '*') else host}:{self.worker_port}"
        # In-process endpoints: threads of this process (the embedded teacher) skip TCP, and
        # inproc hands over message buffers without copying them.
        tag = f"{os.getpid()}-{id(self):x}"
        self.inproc_address, self.inproc_worker_address = f"inproc://teacher-{tag}", f"inproc://teacher-back-{tag}"
        self.front.bind(self.inproc_address)
        self.back.bind(self.inproc_worker_address)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.max_batch_tokens, self.max_batch_requests = max_batch_tokens, max_batch_requests
        self.max_message_bytes = max_message_bytes
        self.cache_entries, self.cache_bytes = cache_entries, cache_bytes
        self.max_queue = max_queue  # bounds the memory a flood of requests can pin
        if worker_prefetch < 1:
            raise ValueError(f"worker_prefetch must be >= 1, got {worker_prefetch}")
        self.worker_prefetch = worker_prefetch
        self.info: dict | None = None
        self.workers: dict[bytes, _Worker] = {}
        self.queue: collections.deque[_Task] = collections.deque()
        self.tasks: dict[str, _Task] = {}
        self.done: collections.OrderedDict[str, list] = collections.OrderedDict()
        self.held: list = []                 # requests that arrived before any worker registered
        self.stats = collections.Counter()
        self._stop = threading.Event()
        self.stop_cause = ""                 # why serve() returned (logged by the CLI)

    @staticmethod
    def _bind_port(sock: zmq.Socket, host: str, port: int) -> int:
        if port == 0:
            return sock.bind_to_random_port(f"tcp://{host}")
        sock.bind(f"tcp://{host}:{port}")
        return port

    # ------------------------------------------------------------------ front
    def _reply(self, ident: bytes, frames: list) -> None:
        self.front.send_multipart([ident, *frames], copy=False)

    def _error(self, ident: bytes, rid: str, err: str, code: P.ErrorCode) -> None:
        self.stats["errors"] += 1
        self._reply(ident, P.encode_reply(rid or "?", error=err, code=code))

    def _on_front(self, ident: bytes, frames: list) -> None:
        bufs = [f.buffer for f in frames]
        try:
            msg = P.decode(bufs, max_bytes=self.max_message_bytes)
            if msg.op == "reply":
                raise P.ProtocolError("clients send requests, not replies")
        except P.ProtocolError as e:
            return self._error(ident, P.peek_id(bufs[0]) if bufs else "", f"bad request: {e}", e.code)
        try:
            self._on_request(ident, frames, msg)
        except Exception as e:  # noqa: BLE001 - a bug here must not stop the server for everyone
            log.exception("request %s failed inside the server", msg.id)
            self._error(ident, msg.id, f"internal server error: {type(e).__name__}: {e}", P.ErrorCode.INTERNAL)

    def _on_request(self, ident: bytes, frames: list, msg: P.Message) -> None:
        if msg.op == "ping":
            return self._reply(ident, P.encode_reply(msg.id, meta={"pong": True, "workers": len(self.workers)}))
        if self.info is None:
            if len(self.held) >= self.max_queue:
                return self._error(ident, msg.id, f"server busy: {self.max_queue} requests wait for a worker",
                                   P.ErrorCode.BUSY)
            self.held.append((ident, frames))
            return
        if msg.op == "info":
            return self._reply(ident, P.encode_reply(msg.id, meta={**self.info,
                                                                  "protocol_version": P.PROTOCOL_VERSION}))
        if msg.id in self.done:
            self.stats["dedup_done"] += 1
            return self._reply(ident, self.done[msg.id])
        if msg.id in self.tasks:
            self.stats["dedup_running"] += 1
            self.tasks[msg.id].waiters.add(ident)
            return
        if len(self.queue) >= self.max_queue:
            return self._error(ident, msg.id, f"server busy: {self.max_queue} requests already queued",
                               P.ErrorCode.BUSY)
        try:
            if msg.op == "score":
                a = P.validate_score(msg, self.info)
                task = _Task(msg.id, msg.op, frames, P.batch_key(a), P.request_tokens(a))
            elif msg.op == "head":   # H7
                P.validate_head(msg, self.info)
                task = _Task(msg.id, msg.op, frames, None, 0)
            elif msg.op == "vocab":   # issue 15
                P.validate_vocab(msg, self.info)
                task = _Task(msg.id, msg.op, frames, None, 0)
            else:
                P.validate_generate(msg, self.info)
                task = _Task(msg.id, msg.op, frames, None, 0)
        except P.ProtocolError as e:
            return self._error(ident, msg.id, f"bad {msg.op} request: {e}", e.code)
        task.waiters.add(ident)
        self.tasks[msg.id] = task
        self.queue.append(task)

    # ------------------------------------------------------------------- back
    def _send_worker(self, wid: bytes, frames: list) -> None:
        self.back.send_multipart([wid, *frames], copy=False)

    def _on_back(self, wid: bytes, frames: list) -> None:
        try:
            m = P.decode_worker_message([f.buffer for f in frames])
        except P.ProtocolError as e:
            self.stats["bad_worker_messages"] += 1
            log.warning("dropping malformed message from worker %s: %s", wid.hex()[:8], e)
            if e.code == P.ErrorCode.VERSION_MISMATCH:
                self._send_worker(wid, P.encode_reject(str(e)))
            return
        w = self.workers.get(wid)
        if m.kind == "ready":
            try:
                info = check_info(m.info)
                if self.info is not None and any(info[k] != self.info[k] for k in
                                                 ("vocab_size", "tokenizer_fingerprint")):
                    raise ValueError("its tokenizer differs from the registered workers'")
            except ValueError as e:
                log.error("rejecting worker: %s", e)
                return self._send_worker(wid, P.encode_reject(str(e)))
            if w is None:
                self.workers[wid] = _Worker(info, time.monotonic())
                log.info("worker %s registered (%d total)", wid.hex()[:8], len(self.workers))
            if self.info is None:
                self.info = info
                held, self.held = self.held, []
                for ident, fr in held:
                    self._on_front(ident, fr)
            return
        if w is None:  # a worker from before a server restart: ask it to register again
            return self._send_worker(wid, P.encode_who())
        w.last_seen = time.monotonic()
        if m.kind == "reply":
            self._on_result(w, m.frames)

    def _on_result(self, w: _Worker, frames: list) -> None:
        try:
            msg = P.decode(frames, max_bytes=4 * P.MAX_MESSAGE_BYTES)
            if msg.op != "reply":
                raise P.ProtocolError("workers send replies, not requests")
        except P.ProtocolError as e:
            self.stats["bad_worker_messages"] += 1
            log.warning("dropping bad worker reply: %s", e)
            return
        for ids in w.tasks:
            ids.discard(msg.id)
        w.tasks = [ids for ids in w.tasks if ids]
        task = self.tasks.pop(msg.id, None)
        if task is None:
            return  # a late duplicate (the request was re-run elsewhere)
        self.stats["replies"] += 1
        for ident in task.waiters:
            self._reply(ident, frames)
        if msg.ok:
            self.done[msg.id] = frames
            while len(self.done) > self.cache_entries or (
                    len(self.done) > 1 and sum(len(f) for fr in self.done.values() for f in fr) > self.cache_bytes):
                self.done.popitem(last=False)

    # --------------------------------------------------------------- dispatch
    def _dispatch(self) -> None:
        # A worker may hold `worker_prefetch` tasks: the next one waits in the worker while the
        # current one computes, so the accelerator does not idle for a broker round trip.
        idle = [wid for d in range(self.worker_prefetch) for wid, w in self.workers.items() if len(w.tasks) <= d]
        idle.reverse()  # pop() gives the least loaded worker first
        while idle and self.queue:
            first = self.queue.popleft()
            if first.rid not in self.tasks:
                continue
            batch, tokens = [first], first.tokens
            if first.key is not None:
                rest = collections.deque()
                while self.queue and len(batch) < self.max_batch_requests:
                    t = self.queue.popleft()
                    if t.key == first.key and tokens + t.tokens <= self.max_batch_tokens:
                        batch.append(t)
                        tokens += t.tokens
                    else:
                        rest.append(t)
                self.queue.extendleft(reversed(rest))
            wid = idle.pop()
            self.workers[wid].tasks.append({t.rid for t in batch})
            self.stats["tasks"] += 1
            self.stats["batched_requests"] += len(batch)
            self._send_worker(wid, P.encode_task([t.frames for t in batch]))

    def _reap(self) -> None:
        now = time.monotonic()
        for wid, w in list(self.workers.items()):
            if now - w.last_seen > self.heartbeat_timeout_s:
                log.warning("worker %s missed heartbeats; re-queueing %d request(s)", wid.hex()[:8], len(w.running))
                del self.workers[wid]
                self.stats["workers_lost"] += 1
                for rid in w.running:
                    if rid in self.tasks:
                        self.stats["requeued"] += 1
                        self.queue.appendleft(self.tasks[rid])

    # ------------------------------------------------------------------- loop
    def _guarded(self, handler: Any, ident: bytes, frames: list, side: str) -> None:
        """One message's failure is logged and counted; the loop goes on for everyone else."""
        try:
            handler(ident, frames)
        except Exception:  # noqa: BLE001
            self.stats["handler_errors"] += 1
            log.exception("%s message dropped after an error in the server", side)

    def serve(self) -> None:
        """Run the loop until stop(); an exception that escapes it is logged and re-raised."""
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        tick = max(0.01, min(0.25, self.heartbeat_timeout_s / 4))
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(timeout=tick * 1000))
                if self.back in events:
                    while True:
                        try:
                            wid, *frames = self.back.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._guarded(self._on_back, wid.bytes, frames, "worker")
                if self.front in events:
                    for _ in range(256):
                        try:
                            ident, *frames = self.front.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._guarded(self._on_front, ident.bytes, frames, "client")
                self._reap()
                self._dispatch()
        except BaseException as e:
            self.stop_cause = self.stop_cause or f"{type(e).__name__}: {e}"
            log.exception("teacher server loop failed")
            raise
        finally:
            self.front.close(0)
            self.back.close(0)

    def bind(self, address: str, *, workers: bool = True) -> None:
        """Also listen on `address` (ipc://, tcp://) for workers (or, workers=False, for clients)."""
        (self.back if workers else self.front).bind(address)

    def stop(self, cause: str = "stop() called") -> None:
        """Ask serve() to return; `cause` is kept in `stop_cause` for the log."""
        if not self._stop.is_set():
            self.stop_cause = cause
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve, name="teacher-server", daemon=True)
        t.start()
        return t


if __name__ == "__main__":  # the old entry point; `python -m gold_jax.teacher` is the new one
    import runpy
    runpy.run_module("gold_jax.teacher", run_name="__main__", alter_sys=True)

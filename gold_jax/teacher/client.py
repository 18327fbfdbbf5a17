"""Teacher client: futures over a ZeroMQ DEALER socket, with timeouts and retries.

One I/O thread owns the socket (ZeroMQ sockets are not thread-safe). Each
request keeps its id across retries, so the server can answer a retry from its
cache or attach it to the running computation: a batch is never lost (it is
re-sent after a timeout, also to a restarted server) and never applied twice
(a future is resolved once; late duplicate replies are dropped). ZeroMQ
reconnects the socket by itself after a server restart.

The I/O thread survives any one bad reply (it fails that request's future, or
drops and counts a reply it cannot attribute). Should the loop itself fail, the
futures it held fail with ConnectionError, so that a caller's wait-and-resend
(the trainer's `resolve`) takes over instead of waiting forever, and the loop
restarts on a fresh socket.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

import numpy as np
import zmq

from gold_jax.teacher import protocol as P
from gold_jax.types import SequenceBatch


log = logging.getLogger("gold_jax.teacher.client")


class TeacherError(RuntimeError):
    """The server or a worker failed on a request."""


class TeacherRequestError(ValueError):
    """The teacher refused the request itself (bad arguments, another protocol version): do not retry."""


@dataclasses.dataclass
class _Req:
    rid: str
    op: str
    frames: list
    future: Future
    decode: Callable[[P.Message], Any]
    attempts: int = 0
    deadline: float = 0.0


class TeacherClient:
    """Talk to a teacher server; several requests in flight, each a Future."""

    def __init__(self, address: str, *, timeout_s: float = 60.0, max_retries: int = 5, max_in_flight: int = 4,
                 student_vocab_size: int | None = None, tokenizer_fingerprint: str | None = None):
        """With `tokenizer_fingerprint` (and optionally `student_vocab_size`) the teacher's info is
        checked here, so a tokenizer mismatch fails at start-up instead of as a wrong loss later."""
        if not isinstance(address, str) or not address.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"address must look like 'tcp://HOST:PORT', got {address!r}")
        if timeout_s <= 0 or max_retries < 0 or max_in_flight < 1:
            raise ValueError(f"need timeout_s > 0, max_retries >= 0, max_in_flight >= 1; got "
                             f"{timeout_s}, {max_retries}, {max_in_flight}")
        self.address, self.timeout_s = address, timeout_s
        self.max_retries, self.max_in_flight = max_retries, max_in_flight
        self._ctx = zmq.Context.instance()
        self._submit: queue.Queue = queue.Queue()
        self._wake_addr = f"inproc://teacher-client-{uuid.uuid4().hex}"
        self._wake_rx = self._ctx.socket(zmq.PAIR)
        self._wake_rx.bind(self._wake_addr)
        self._wake_tx = self._ctx.socket(zmq.PAIR)
        self._wake_tx.connect(self._wake_addr)
        self._wake_lock = threading.Lock()
        self._closed = threading.Event()
        self.stats = collections.Counter()
        self._thread = threading.Thread(target=self._run, name="teacher-client", daemon=True)
        self._thread.start()
        self.teacher_info: dict[str, Any] | None = None
        if tokenizer_fingerprint is not None:
            try:
                self.teacher_info = self.check_student(student_vocab_size, tokenizer_fingerprint)
            except BaseException:
                self.close()
                raise

    # ------------------------------------------------------------- public API
    def info(self) -> dict[str, Any]:
        """The teacher's info; ValueError when it speaks another protocol version (the handshake)."""
        return self._wait(self._call("info", {}, {}, self._decode_info))

    def _decode_info(self, m: P.Message) -> dict[str, Any]:
        v = m.args.get("protocol_version")
        if v != P.PROTOCOL_VERSION:
            raise TeacherRequestError(
                f"teacher at {self.address} speaks protocol version {str(v)[:32]}, this client "
                f"{P.PROTOCOL_VERSION}: run the same gold_jax version on trainer and teacher")
        from gold_jax.teacher.backends.base import check_info
        try:
            return {**check_info(m.args), "protocol_version": v}
        except ValueError as e:
            raise TeacherError(f"teacher at {self.address} sent a bad info reply: {e}") from None

    def ping(self) -> dict[str, Any]:
        return self._wait(self._call("ping", {}, {}, lambda m: dict(m.args)))

    def check_student(self, vocab_size: int | None, tokenizer_fingerprint: str,
                      cross_tokenizer: bool = False) -> dict[str, Any]:
        """Fail at start-up (ValueError) when the teacher cannot score this student's tokens.

        Fingerprints, not sizes, decide: checkpoints sharing a tokenizer may pad their
        embeddings differently (151936 vs 152064 rows), and the teacher never returns
        ids beyond the tokenizer, so any student with at least that many rows fits.
        Another tokenizer is refused unless `cross_tokenizer` (config gold.cross_tokenizer):
        then the info comes back with "cross": True and the run scores text (issue 15).
        """
        info = self.info()
        if info["tokenizer_fingerprint"] != tokenizer_fingerprint:
            if not cross_tokenizer:
                raise ValueError(
                    f"teacher at {self.address} ({info['model_name']}) uses a different tokenizer: fingerprint "
                    f"{info['tokenizer_fingerprint'][:16]}... != student's {str(tokenizer_fingerprint)[:16]}...; "
                    "share the student's tokenizer, or set gold.cross_tokenizer=True to distill across "
                    "tokenizers (ULD / hybrid loss on aligned text spans)")
            if not info.get("cross_tokenizer"):
                raise ValueError(f"gold.cross_tokenizer=True: the teacher at {self.address} ({info['model_name']}) "
                                 "does not score text for another tokenizer (its backend has no tokenizer)")
            return {**info, "cross": True}
        if vocab_size is not None and vocab_size < info["vocab_size"]:
            raise ValueError(
                f"student vocab_size (embedding rows) {vocab_size} is smaller than the tokenizer size "
                f"{info['vocab_size']} of the teacher at {self.address}")
        return {**info, "cross": False}

    def vocab(self) -> dict[str, int]:
        """The teacher's token string -> id map (issue 15: fetched once per cross-tokenizer run)."""
        info = self.info()
        return self._wait(self._call("vocab", {}, {},
                                     lambda m: P.vocab_from_message(m, vocab_size=info["embedding_size"])))

    def score(self, batch: SequenceBatch, *, top_k: int, temperature: float, signal: str = "logprobs",
              cross: Any = None) -> Future:
        """Future[TeacherScores] for the completion span of `batch` (R rows); signal "hidden" (H7): the
        teacher's final normed hidden states [B, R, H] in bfloat16 instead of log-probs; signal "cross"
        (issue 15, `cross` a gold_jax.crosstok.request.CrossSpec): the text goes, the teacher's top-k comes
        back aligned to the student's positions, ids mapped into the student vocabulary."""
        if not isinstance(batch, SequenceBatch):
            raise TypeError(f"batch must be a SequenceBatch, got {type(batch).__name__}")
        if signal == "cross":
            if cross is None:
                raise ValueError("signal 'cross' needs the run's CrossSpec (cross=...)")
            args, arrays = cross.request(batch)
            b, r = batch.completion_ids.shape
            return self._call("score", {"top_k": int(top_k), "temperature": float(temperature), **args}, arrays,
                              lambda m: cross.to_student_ids(P.cross_scores_from_message(m, batch=b, rows=r,
                                                                                           top_k=int(top_k))))
        ids = np.asarray(batch.input_ids, np.int32)
        mask = np.asarray(batch.attention_mask, np.int32)
        b, r = ids.shape[0], batch.completion_ids.shape[1]
        args = {"top_k": int(top_k), "temperature": float(temperature), "completion_start": batch.completion_start}
        if signal != "logprobs":
            args["signal"] = signal
        return self._call("score", args, {"input_ids": ids, "attention_mask": mask},
                          lambda m: P.scores_from_message(m, batch=b, rows=r, top_k=int(top_k), signal=signal))

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """(lm head [H, V], final norm [H]) fetched once, in column slices, and checked against the
        checksum in the teacher's info (H7)."""
        from gold_jax.teacher.head import check_checksum, head_checksum
        info = self.info()
        h, v = info.get("hidden_size"), info["embedding_size"]
        if not h:
            raise TeacherRequestError(f"teacher at {self.address} does not serve hidden states or its head")
        step = max(1, P.HEAD_MAX_BYTES // (4 * h))
        parts, norm = [], None
        for start in range(0, v, step):
            count = min(step, v - start)
            w, norm = self._wait(self._call("head", {"start": start, "count": count}, {},
                                            lambda m, c=count: P.head_from_message(m, hidden_size=h, count=c)))
            parts.append(np.array(w))
        head = np.concatenate(parts, axis=1)
        check_checksum(head_checksum(head, norm), info["head_checksum"], f"the teacher at {self.address}")
        return head, np.array(norm)

    def generate(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray, *, max_new_tokens: int,
                 temperature: float, top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> Future:
        """Future[RolloutResult] of teacher completions (seq_kd)."""
        args = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature),
                "top_p": float(top_p), "top_k": int(top_k), "seed": int(seed)}
        arrays = {"prompt_ids": np.asarray(prompt_ids, np.int32), "prompt_mask": np.asarray(prompt_mask, np.int32)}
        return self._call("generate", args, arrays, P.rollout_from_message)

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._wake()
            self._thread.join(timeout=5)
            with self._wake_lock:
                self._wake_tx.close(0)
            self._wake_rx.close(0)

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --------------------------------------------------------------- plumbing
    def _wait(self, fut: Future) -> Any:
        return fut.result(timeout=self.timeout_s * (self.max_retries + 1) + 5)

    def _wake(self) -> None:
        with self._wake_lock:
            if not self._wake_tx.closed:
                try:
                    self._wake_tx.send(b"", zmq.NOBLOCK)
                except zmq.Again:
                    pass  # a wake-up is already pending

    def _call(self, op: str, args: dict, arrays: dict, decode: Callable) -> Future:
        if self._closed.is_set():
            raise ConnectionError(f"TeacherClient({self.address}) is closed")
        fut: Future = Future()
        rid = uuid.uuid4().hex
        req = _Req(rid, op, P.encode_request(rid, op, args, arrays), fut, decode)
        self._submit.put(req)
        self._wake()
        if self._closed.is_set() and not self._thread.is_alive():
            # close() ran meanwhile and the I/O thread has drained its queue: never leave it pending.
            self._finish(req, error=ConnectionError(f"TeacherClient({self.address}) is closed"))
        return fut

    def _finish(self, req: _Req, result: Any = None, error: BaseException | None = None) -> None:
        if req.future.done():
            return
        try:
            if error is not None:
                req.future.set_exception(error)
            else:
                req.future.set_result(result)
        except InvalidStateError:
            pass  # cancelled by the caller meanwhile

    def _send(self, sock: zmq.Socket, req: _Req) -> None:
        req.attempts += 1
        req.deadline = time.monotonic() + self.timeout_s
        try:
            sock.send_multipart(req.frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.stats["send_blocked"] += 1  # no connection yet: the timeout re-sends it

    def _on_reply(self, inflight: dict, frames: list) -> None:
        bufs = [f.buffer for f in frames]
        try:
            msg = P.decode(bufs, max_bytes=4 * P.MAX_MESSAGE_BYTES)
            if msg.op != "reply":
                raise P.ProtocolError("the server sent a request, not a reply")
        except P.ProtocolError as e:
            self.stats["bad_replies"] += 1
            req = inflight.pop(P.peek_id(bufs[0]) if bufs else "", None)
            if req is None:
                log.warning("dropping a malformed reply from %s: %s", self.address, e)
                return
            cls = TeacherRequestError if e.code == P.ErrorCode.VERSION_MISMATCH else TeacherError
            return self._finish(req, error=cls(f"teacher at {self.address} sent a malformed reply: {e}"))
        req = inflight.pop(msg.id, None)
        if req is None:
            self.stats["duplicate_replies"] += 1
            return
        if not msg.ok:
            cls = TeacherRequestError if msg.code in P.CLIENT_FAULTS else TeacherError
            return self._finish(req, error=cls(f"teacher at {self.address}: {msg.error}"))
        try:
            self._finish(req, req.decode(msg))
        except (TeacherError, TeacherRequestError) as e:
            self._finish(req, error=e)
        except Exception as e:  # noqa: BLE001 - a malformed reply fails only its own future
            self._finish(req, error=TeacherError(f"teacher at {self.address} sent a bad {req.op} reply: {e}"))

    def _run(self) -> None:
        """The I/O thread: `_loop` until close(); a loop that fails fails its futures and restarts."""
        waiting: collections.deque[_Req] = collections.deque()
        inflight: dict[str, _Req] = {}
        while True:
            try:
                self._loop(waiting, inflight)
                err: BaseException = ConnectionError(f"TeacherClient({self.address}) closed")
            except Exception as e:  # noqa: BLE001
                self.stats["io_failures"] += 1
                log.exception("teacher client I/O loop failed; failing %d pending request(s) and restarting",
                              len(inflight) + len(waiting))
                err = ConnectionError(f"teacher client I/O for {self.address} failed: {type(e).__name__}: {e}")
            for req in [*inflight.values(), *waiting]:
                self._finish(req, error=err)
            inflight.clear()
            waiting.clear()
            if self._closed.is_set():
                while not self._submit.empty():
                    self._finish(self._submit.get_nowait(), error=err)
                return
            time.sleep(0.1)

    def _loop(self, waiting: collections.deque, inflight: dict) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)      # notice a dead TCP peer and reconnect
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        sock.connect(self.address)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        try:
            while not self._closed.is_set():
                now = time.monotonic()
                nxt = min((r.deadline for r in inflight.values()), default=now + 0.5)
                events = dict(poller.poll(timeout=max(1, min(500, (nxt - now) * 1000 + 1))))
                if self._wake_rx in events:
                    while True:
                        try:
                            self._wake_rx.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                while True:
                    try:
                        waiting.append(self._submit.get_nowait())
                    except queue.Empty:
                        break
                if sock in events:
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        try:
                            self._on_reply(inflight, frames)
                        except Exception:  # noqa: BLE001 - one reply must not end the I/O thread
                            self.stats["bad_replies"] += 1
                            log.exception("dropping a reply from %s after an error", self.address)
                now = time.monotonic()
                for req in [r for r in inflight.values() if r.deadline <= now]:
                    if req.attempts > self.max_retries:
                        del inflight[req.rid]
                        self._finish(req, error=TimeoutError(
                            f"teacher server at {self.address} did not answer {req.op} request {req.rid} "
                            f"in {req.attempts} attempts of {self.timeout_s:g}s (is it running?)"))
                    else:
                        self.stats["retries"] += 1
                        self._send(sock, req)
                while waiting and len(inflight) < self.max_in_flight:
                    req = waiting.popleft()
                    if req.future.cancelled():
                        continue
                    inflight[req.rid] = req
                    self._send(sock, req)
        finally:
            sock.close(0)

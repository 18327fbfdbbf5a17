"""Teacher worker: wraps a backend and serves tasks from a server's back socket.

The socket thread keeps heartbeating while a compute thread runs the backend,
so a long forward pass is not mistaken for a dead worker, and a worker that is
killed stops heartbeating and gets its requests re-queued by the server.

    python -m gold_jax.teacher.worker --model PATH --connect tcp://HOST:15556 [--backend jax] [--dtype auto]

A malformed message from the server is logged and dropped; a worker that the
server rejects, or whose loop fails, exits non-zero with the cause in its log.
"""
from __future__ import annotations

import argparse
import logging
import os
import queue
import threading
import time
import uuid

import numpy as np
import zmq

from gold_jax import cli_errors
from gold_jax.teacher import protocol as P
from gold_jax.teacher.backends.base import TeacherBackend, check_info
from gold_jax.types import TeacherScores

log = logging.getLogger("gold_jax.teacher.worker")


def run_task(backend: TeacherBackend, info: dict, requests: list[list]) -> list[list]:
    """Reply frames for each request; compatible score requests share one backend call."""
    replies: list = [None] * len(requests)
    scores = []  # (index, id, args)
    for i, frames in enumerate(requests):
        rid = P.peek_id(frames[0]) if frames else "?"
        try:
            msg = P.decode(frames)
            rid = msg.id
            if msg.op == "score":
                scores.append((i, rid, P.validate_score(msg, info)))
            elif msg.op == "head":   # H7: a slice of the lm head's columns, and the final norm
                a = P.validate_head(msg, info)
                w, n = backend.head()
                replies[i] = P.encode_reply(rid, arrays={"head": w[:, a["start"]:a["start"] + a["count"]],
                                                         "norm": n})
            elif msg.op == "vocab":   # issue 15: the teacher's token strings, once per cross-tokenizer run
                P.validate_vocab(msg, info)
                replies[i] = P.encode_reply(rid, arrays=P.vocab_to_arrays(_vocab(backend)))
            elif msg.op == "generate":
                r = backend.generate(**P.validate_generate(msg, info))
                replies[i] = P.encode_reply(rid, arrays=P.rollout_to_arrays(r))
            else:
                raise P.ProtocolError(f"op {msg.op!r} is not a worker op")
        except P.ProtocolError as e:   # the sender's mistake: one line, no traceback
            log.warning("bad request %s: %s", rid or "?", e)
            replies[i] = P.encode_reply(rid or "?", error=f"bad request: {e}", code=e.code)
        except Exception as e:  # noqa: BLE001 - every failure becomes an error reply
            log.exception("request %s failed", rid)
            code = P.ErrorCode.BACKEND_FAILED
            replies[i] = P.encode_reply(rid or "?", error=f"{type(e).__name__}: {e}", code=code)
    groups: dict[tuple, list] = {}
    for item in scores:
        groups.setdefault(P.batch_key(item[2]), []).append(item)
    for key, items in groups.items():
        _, top_k, temp, cs, _, signal = key[:6]
        if signal == "cross":
            _cross_group(backend, info, items, replies)
            continue
        try:
            ids = np.concatenate([a["input_ids"] for _, _, a in items])
            mask = np.concatenate([a["attention_mask"] for _, _, a in items])
            if signal == "hidden":   # H7: final normed hidden states, bfloat16
                s = TeacherScores(None, None, None, None, hidden=backend.hidden(ids, mask, completion_start=cs))
            else:
                s = backend.score(ids, mask, top_k=top_k, temperature=temp, completion_start=cs)
            off = 0
            for i, rid, a in items:
                b = a["input_ids"].shape[0]
                arrays = {k: (None if v is None else v[off:off + b]) for k, v in P.scores_to_arrays(s).items()}
                replies[i] = P.encode_reply(rid, arrays=arrays)
                off += b
        except Exception as e:  # noqa: BLE001
            log.exception("score batch failed")
            for i, rid, _ in items:
                replies[i] = P.encode_reply(rid, error=f"{type(e).__name__}: {e}")
    return replies


def _vocab(backend: TeacherBackend) -> dict[str, int]:
    tok = backend.tokenizer
    try:
        return dict(tok.get_vocab(with_added_tokens=True))
    except TypeError:   # transformers' get_vocab() takes no argument and includes added tokens
        return dict(tok.get_vocab())


def _cross_group(backend: TeacherBackend, info: dict, items: list, replies: list) -> None:
    """Cross-tokenizer score requests of one batch key (issue 15): one backend call for all their rows."""
    from gold_jax.crosstok.request import score_rows
    from gold_jax.data.special_tokens import eos_token_ids
    a0 = items[0][2]
    try:
        pieces = [p for _, _, a in items for p in a["pieces"]]
        ends = np.concatenate([a["student_ends"] for _, _, a in items])
        try:
            eos = eos_token_ids(backend.tokenizer)
        except ValueError:
            eos = ()
        out = score_rows(backend, backend.tokenizer, pieces, ends, top_k=a0["top_k"], temperature=a0["temperature"],
                         strategy=a0["strategy"], skip_teacher_eos=a0["skip_teacher_eos"], eos_ids=eos,
                         max_length=info["max_length"])
        off = 0
        for i, rid, a in items:
            b = a["student_ends"].shape[0]
            replies[i] = P.encode_reply(rid, arrays={k: v[off:off + b] for k, v in out.items()})
            off += b
    except ValueError as e:   # the rows do not fit this teacher (too long): the sender's problem, one line
        log.warning("cross score batch refused: %s", e)
        for i, rid, _ in items:
            replies[i] = P.encode_reply(rid, error=f"bad request: {e}", code=P.ErrorCode.BAD_REQUEST)
    except Exception as e:  # noqa: BLE001
        log.exception("cross score batch failed")
        for i, rid, _ in items:
            replies[i] = P.encode_reply(rid, error=f"{type(e).__name__}: {e}")


class WorkerRejected(cli_errors.UserError):
    """The server refused this worker (another tokenizer, another protocol version)."""


def _run_task_safely(backend: TeacherBackend, info: dict, requests: list[list]) -> list[list]:
    try:
        return run_task(backend, info, requests)
    except Exception as e:  # noqa: BLE001 - every request still gets a reply, the thread lives on
        log.exception("task of %d request(s) failed", len(requests))
        return [P.encode_reply(P.peek_id(r[0]) if r else "?", error=f"{type(e).__name__}: {e}",
                               code=P.ErrorCode.BACKEND_FAILED) for r in requests]


def serve_worker(backend: TeacherBackend, connect: str, *, heartbeat_s: float = 0.5,
                 stop: threading.Event | None = None) -> None:
    """Register with the server at `connect` and serve until `stop` is set.

    Raises WorkerRejected when the server refuses this worker.
    """
    info = check_info(backend.info())
    stop = stop or threading.Event()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(connect)
    wake_addr = f"inproc://teacher-worker-{uuid.uuid4().hex}"
    wake_rx = ctx.socket(zmq.PAIR)
    wake_rx.bind(wake_addr)
    tasks: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()

    def compute() -> None:
        wake_tx = ctx.socket(zmq.PAIR)
        wake_tx.connect(wake_addr)
        try:
            while True:
                req = tasks.get()
                if req is None:
                    return
                results.put(_run_task_safely(backend, info, req))
                wake_tx.send(b"")
        finally:
            wake_tx.close(0)

    worker = threading.Thread(target=compute, name="teacher-compute", daemon=True)
    worker.start()
    ready, hb = P.encode_ready(info), P.encode_heartbeat()
    sock.send_multipart(ready)
    last = time.monotonic()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(wake_rx, zmq.POLLIN)
    try:
        while not stop.is_set():
            events = dict(poller.poll(timeout=heartbeat_s * 1000))
            if wake_rx in events:
                wake_rx.recv()
                for reply in results.get_nowait():
                    sock.send_multipart(P.encode_worker_reply(reply), copy=False)
            if sock in events:
                frames = sock.recv_multipart(copy=False)
                try:
                    m = P.decode_server_message([f.buffer for f in frames])
                except P.ProtocolError as e:
                    log.warning("dropping malformed message from the server: %s", e)
                    m = None
                if m is None:
                    pass
                elif m.kind == "task":
                    tasks.put(m.requests)
                elif m.kind == "who":
                    sock.send_multipart(ready)
                elif m.kind == "reject":
                    log.error("server rejected this worker: %s", m.error)
                    raise WorkerRejected(f"teacher server at {connect} rejected this worker: {m.error}")
            if time.monotonic() - last >= heartbeat_s:
                sock.send_multipart(hb)
                last = time.monotonic()
    finally:
        tasks.put(None)
        worker.join(timeout=5)
        sock.close(0)
        wake_rx.close(0)


def main(argv: list[str] | None = None) -> None:
    from gold_jax.teacher.backends import BACKENDS, TEACHER_DTYPES
    ap = argparse.ArgumentParser(prog="python -m gold_jax.teacher.worker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--backend", default="jax", choices=BACKENDS)
    ap.add_argument("--dtype", default="auto", choices=TEACHER_DTYPES,
                    help="teacher compute dtype; auto = bfloat16 on accelerators, float32 on CPU")
    ap.add_argument("--connect", default="tcp://127.0.0.1:15556", help="the server's worker (back) address")
    ap.add_argument("--heartbeat", type=float, default=0.5, help="seconds between heartbeats")
    ap.add_argument("--exit-with-parent", action="store_true",
                    help="exit when the parent process (a server that started us) dies, even by SIGKILL")
    cli_errors.add_verbosity_flag(ap)
    args = ap.parse_args(argv)
    if args.exit_with_parent:
        parent = os.getppid()

        def watch() -> None:
            while os.getppid() == parent:  # re-parented once the parent is gone
                time.sleep(1.0)
            os._exit(0)
        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cli_errors.run(_serve, args, verbosity=args.verbosity)
    log.info("worker stopped")


def _serve(args: argparse.Namespace) -> None:
    from gold_jax.teacher.backends import make_backend
    if not os.path.isdir(args.model):
        raise cli_errors.UserError(f"--model {args.model!r} is not a directory")
    backend = make_backend(args.backend, args.model, dtype=args.dtype)
    log.info("worker ready (%s), connecting to %s", backend.info()["model_name"], args.connect)
    try:
        serve_worker(backend, args.connect, heartbeat_s=args.heartbeat)
    except BaseException as e:
        log.error("worker stopped: %s: %s", type(e).__name__, e)
        raise


if __name__ == "__main__":
    main()

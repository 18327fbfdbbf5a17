"""Teacher worker: wraps a backend and serves tasks from a server's back socket.

The socket thread keeps heartbeating while a compute thread runs the backend,
so a long forward pass is not mistaken for a dead worker, and a worker that is
killed stops heartbeating and gets its requests re-queued by the server.

    python -m gold_jax.teacher.worker --model PATH --connect tcp://HOST:15556 [--backend jax]
"""
from __future__ import annotations

import argparse
import logging
import os
import queue
import threading
import time
import uuid

import msgpack
import numpy as np
import zmq

from gold_jax.teacher import protocol as P
from gold_jax.teacher.backends.base import TeacherBackend, check_info

log = logging.getLogger("gold_jax.teacher.worker")


def _split_task(frames: list) -> list[list]:
    header = msgpack.unpackb(frames[0].bytes, raw=False)
    out, i = [], 1
    for n in header["n_frames"]:
        out.append([f.buffer for f in frames[i:i + n]])
        i += n
    return out


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
            elif msg.op == "generate":
                r = backend.generate(**P.validate_generate(msg, info))
                replies[i] = P.encode_reply(rid, arrays=P.rollout_to_arrays(r))
            else:
                raise P.ProtocolError(f"op {msg.op!r} is not a worker op")
        except Exception as e:  # noqa: BLE001 - every failure becomes an error reply
            log.exception("request %s failed", rid)
            replies[i] = P.encode_reply(rid or "?", error=f"{type(e).__name__}: {e}")
    groups: dict[tuple, list] = {}
    for item in scores:
        a = item[2]
        groups.setdefault((a["top_k"], a["temperature"], a["completion_start"], a["input_ids"].shape[1]),
                          []).append(item)
    for (top_k, temp, cs, _), items in groups.items():
        try:
            ids = np.concatenate([a["input_ids"] for _, _, a in items])
            mask = np.concatenate([a["attention_mask"] for _, _, a in items])
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


def serve_worker(backend: TeacherBackend, connect: str, *, heartbeat_s: float = 0.5,
                 stop: threading.Event | None = None) -> None:
    """Register with the server at `connect` and serve until `stop` is set or the server rejects us."""
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
                results.put(run_task(backend, info, req))
                wake_tx.send(b"")
        finally:
            wake_tx.close(0)

    worker = threading.Thread(target=compute, name="teacher-compute", daemon=True)
    worker.start()
    ready = msgpack.packb({"type": "ready", "info": info})
    hb = msgpack.packb({"type": "hb"})
    reply_hdr = msgpack.packb({"type": "reply"})
    sock.send(ready)
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
                    sock.send_multipart([reply_hdr, *reply], copy=False)
            if sock in events:
                frames = sock.recv_multipart(copy=False)
                kind = msgpack.unpackb(frames[0].bytes, raw=False).get("type")
                if kind == "task":
                    tasks.put(_split_task(frames))
                elif kind == "who":
                    sock.send(ready)
                elif kind == "reject":
                    log.error("server rejected this worker: %s",
                              msgpack.unpackb(frames[0].bytes, raw=False).get("error"))
                    return
            if time.monotonic() - last >= heartbeat_s:
                sock.send(hb)
                last = time.monotonic()
    finally:
        tasks.put(None)
        worker.join(timeout=5)
        sock.close(0)
        wake_rx.close(0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--backend", default="jax", choices=("jax", "vllm"))
    ap.add_argument("--connect", default="tcp://127.0.0.1:15556", help="the server's worker (back) address")
    ap.add_argument("--heartbeat", type=float, default=0.5, help="seconds between heartbeats")
    ap.add_argument("--exit-with-parent", action="store_true",
                    help="exit when the parent process (a server that started us) dies, even by SIGKILL")
    args = ap.parse_args(argv)
    if args.exit_with_parent:
        parent = os.getppid()

        def watch() -> None:
            while os.getppid() == parent:  # re-parented once the parent is gone
                time.sleep(1.0)
            os._exit(0)
        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from gold_jax.teacher.backends import make_backend
    backend = make_backend(args.backend, args.model)
    log.info("worker ready (%s), connecting to %s", backend.info()["model_name"], args.connect)
    serve_worker(backend, args.connect, heartbeat_s=args.heartbeat)


if __name__ == "__main__":
    main()

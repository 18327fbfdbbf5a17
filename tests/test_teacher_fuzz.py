"""Fuzz the teacher's wire (issue 12 item 9): server front and back sockets, and a worker.

Thousands of malformed messages: random bytes, truncated msgpack, a wrong type in
every field, huge and negative sizes, NaN, wrong frame counts. The server and the
worker must survive all of them, then answer a valid request correctly, and their
resident memory (from /proc) must grow by less than 50 MiB.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import zmq

from gold_jax.teacher import protocol as P
from gold_jax.teacher.client import TeacherClient
from gold_jax.types import SequenceBatch

sys.path.insert(0, os.path.dirname(__file__))
from teacher_fake import FakeBackend  # noqa: E402

FAKE_SCRIPT = os.path.join(os.path.dirname(__file__), "teacher_fake.py")
WRONG = [None, True, False, -1, -(1 << 63), (1 << 64) - 1, 0, 3.5, float("nan"), float("inf"), -float("inf"),
         "", "int32", "x" * 300, b"\x00\xff", [], [1], ["int32"], [[1, 2]], {}, {"a": 1}, {"int32": [1]}]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def valid_request(rng, rid="ok"):
    ids = rng.integers(0, 50, (2, 8)).astype(np.int32)
    return P.encode_request(rid, "score", {"top_k": 4, "temperature": 1.0, "completion_start": 4},
                            {"input_ids": ids, "attention_mask": np.ones_like(ids)})


def set_path(h, path, value):
    """A copy of header map `h` with the field at `path` (keys and list indices) set to `value`."""
    h = msgpack.unpackb(msgpack.packb(h))
    node = h
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return h


def field_paths(h, prefix=()):
    out = []
    items = h.items() if isinstance(h, dict) else enumerate(h) if isinstance(h, list) else []
    for k, v in items:
        out.append((*prefix, k))
        out.extend(field_paths(v, (*prefix, k)))
    return out


def front_messages(rng, n):
    """n malformed client -> server messages of every kind."""
    good = valid_request(rng)
    header = msgpack.unpackb(good[0])
    paths = field_paths(header)
    gen_header = msgpack.unpackb(P.encode_request("g", "generate", {"max_new_tokens": 4, "temperature": 1.0,
                                                                    "top_p": 1.0, "top_k": 0, "seed": 1},
                                                  {"prompt_ids": np.zeros((1, 3), np.int32),
                                                   "prompt_mask": np.ones((1, 3), np.int32)})[0])
    gen_paths = field_paths(gen_header)
    for i in range(n):
        kind = i % 10
        if kind == 0:      # random bytes, one or several frames
            yield [rng.bytes(int(rng.integers(0, 2000))) for _ in range(int(rng.integers(1, 4)))]
        elif kind == 1:    # truncated msgpack header, arrays as they were
            yield [good[0][:int(rng.integers(0, len(good[0])))], *good[1:]]
        elif kind == 2:    # a wrong type in one field of a score request
            h = set_path(header, paths[int(rng.integers(len(paths)))], WRONG[int(rng.integers(len(WRONG)))])
            h["id"] = f"f{i}" if isinstance(h.get("id"), str) else h.get("id")
            yield [msgpack.packb(h), *good[1:]]
        elif kind == 3:    # the same in a generate request
            h = set_path(gen_header, gen_paths[int(rng.integers(len(gen_paths)))], WRONG[int(rng.integers(len(WRONG)))])
            yield [msgpack.packb(h), np.zeros((1, 3), np.int32).tobytes(), np.ones((1, 3), np.int32).tobytes()]
        elif kind == 4:    # huge and negative sizes
            d = [int(x) for x in rng.choice([-1, -(1 << 31), 1 << 31, 1 << 40, (1 << 63) - 1, 0, 2], 2)]
            h = set_path(header, ("arrays", int(rng.integers(2)), 2), d)
            yield [msgpack.packb(h), *good[1:]]
        elif kind == 5:    # NaN, inf and out-of-range numbers in the arguments
            key = ["top_k", "temperature", "completion_start"][i % 3]
            val = [float("nan"), float("inf"), -1, 1 << 62, -(1 << 62), 10 ** 6][int(rng.integers(6))]
            yield [msgpack.packb(set_path(header, ("args", key), val)), *good[1:]]
        elif kind == 6:    # wrong frame counts
            k = int(rng.integers(0, 6))
            yield [good[0], *([good[1]] * k)] if k != 2 else [good[0]]
        elif kind == 7:    # token ids and mask values out of range, float arrays
            ids = rng.integers(-100, 1 << 20, (2, 8)).astype(np.int32)
            mask = rng.integers(-2, 3, (2, 8)).astype(np.int32)
            arrs = {"input_ids": ids, "attention_mask": mask} if i % 2 else \
                {"input_ids": ids.astype(np.float32), "attention_mask": mask}
            yield P.encode_request(f"r{i}", "score", {"top_k": 4, "temperature": 1.0}, arrs)
        elif kind == 8:    # a reply, a worker message or deep nesting where a request belongs
            yield [[P.encode_reply("x", error="e")[0], P.encode_ready({})[0], P.encode_heartbeat()[0],
                    msgpack.packb(set_path(header, ("args",), [[[[[[[[[[1]]]]]]]]]] * 100))][i % 4]]
        else:              # random bit flips in a valid header
            b = bytearray(good[0])
            for _ in range(int(rng.integers(1, 6))):
                b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
            yield [bytes(b), *good[1:]]


def back_messages(rng, n):
    """n malformed worker -> server messages."""
    info = FakeBackend().info()
    for i in range(n):
        kind = i % 5
        if kind == 0:
            yield [rng.bytes(int(rng.integers(0, 500)))]
        elif kind == 1:   # ready with a wrong type in one info field (or a wrong version)
            bad = dict(info)
            key = list(bad)[i % len(bad)] if i % 7 else "v"
            bad[key] = WRONG[int(rng.integers(len(WRONG)))]
            h = {"type": "ready", "v": bad.pop("v", P.PROTOCOL_VERSION), "info": bad}
            yield [msgpack.packb(h)]
        elif kind == 2:   # replies with garbage frames from a worker that never registered
            yield [P.encode_worker_reply([rng.bytes(50)])[0], rng.bytes(int(rng.integers(0, 100)))]
        elif kind == 3:
            yield [msgpack.packb({"type": WRONG[int(rng.integers(len(WRONG)))]})]
        else:
            yield [P.encode_heartbeat()[0], b"extra"]


def task_messages(rng, n):
    """n malformed server -> worker messages (tasks with bad framing or bad requests inside)."""
    good = valid_request(rng, "t")
    for i in range(n):
        kind = i % 5
        if kind == 0:
            yield [rng.bytes(int(rng.integers(0, 300)))]
        elif kind == 1:   # n_frames that do not add up, or of the wrong type
            nf = [[3, 3], [0], [-1], [1 << 40], "3", [3.0], [], None][i % 8]
            yield [msgpack.packb({"type": "task", "n_frames": nf}), *good]
        elif kind == 2:   # a well-framed task whose request is garbage: the worker replies with an error
            frames = next(front_messages(rng, 1)) if i % 2 else [rng.bytes(40)]
            yield P.encode_task([frames])
        elif kind == 3:   # an unknown or wrongly typed message type
            yield [msgpack.packb({"type": WRONG[int(rng.integers(len(WRONG)))]})]
        else:
            yield [msgpack.packb({"type": "task", "n_frames": [1]}), b"\x93\x01"]


@pytest.mark.slow
def test_fuzzed_wire_server_and_worker_survive(tmp_path):
    rng = np.random.default_rng(12)
    port, wport = free_port(), free_port()
    log_path = tmp_path / "server.log"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "gold_jax.teacher", "--model", "-", "--workers", "0",
                                   "--port", str(port), "--worker-port", str(wport), "--heartbeat-timeout", "5"],
                                  stdout=log, stderr=log, env=env)
    worker = subprocess.Popen([sys.executable, FAKE_SCRIPT, "--connect", f"tcp://127.0.0.1:{wport}"], env=env)
    ctx = zmq.Context.instance()
    socks = []
    fuzz_worker = None
    try:
        addr = f"tcp://127.0.0.1:{port}"
        with TeacherClient(addr, timeout_s=2.0, max_retries=30) as c:
            deadline = time.monotonic() + 60
            while c.ping().get("workers", 0) < 1:
                assert time.monotonic() < deadline, "worker did not register"
                time.sleep(0.2)

        front = ctx.socket(zmq.DEALER)
        front.setsockopt(zmq.LINGER, 0)
        front.connect(addr)
        socks.append(front)

        def drain(sock, timeout_ms=20):
            n = 0
            while sock.poll(timeout_ms):
                sock.recv_multipart()
                n += 1
                timeout_ms = 0
            return n

        def send_all(sock, messages, chunk=100):
            sent = got = 0
            for m in messages:
                sock.send_multipart(m)
                sent += 1
                if sent % chunk == 0:
                    got += drain(sock)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                k = drain(sock, 200)
                got += k
                if not k:
                    break
            return sent, got

        send_all(front, front_messages(rng, 300))            # warm-up: allocator pools, caches
        rss0 = {"server": rss_mib(server.pid), "worker": rss_mib(worker.pid)}
        n_front, replies = send_all(front, front_messages(rng, 4000))

        back = ctx.socket(zmq.DEALER)
        back.setsockopt(zmq.LINGER, 0)
        back.connect(f"tcp://127.0.0.1:{wport}")
        socks.append(back)
        n_back, _ = send_all(back, back_messages(rng, 1000))

        # A second fake worker connected to a fuzzing "server": malformed tasks.
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        fport = router.bind_to_random_port("tcp://127.0.0.1")
        socks.append(router)
        fuzz_worker = subprocess.Popen([sys.executable, FAKE_SCRIPT, "--connect", f"tcp://127.0.0.1:{fport}"],
                                       env=env)
        assert router.poll(60_000), "fuzzed worker never said ready"
        wid, ready = router.recv_multipart()
        assert P.decode_worker_message([ready]).kind == "ready"
        fuzz_rss0 = None
        n_tasks = 0
        for m in task_messages(rng, 1000):
            router.send_multipart([wid, *m])
            n_tasks += 1
            if n_tasks == 100:
                time.sleep(0.5)
                fuzz_rss0 = rss_mib(fuzz_worker.pid)
            while router.poll(0):
                router.recv_multipart()
        router.send_multipart([wid, *P.encode_task([valid_request(rng, "after-fuzz")])])
        deadline = time.monotonic() + 30
        reply = None
        while reply is None and time.monotonic() < deadline:
            assert router.poll(30_000), "the fuzzed worker stopped answering"
            _, *frames = router.recv_multipart()
            m = P.decode_worker_message(frames)
            if m.kind == "reply" and P.decode(m.frames).id == "after-fuzz":
                reply = P.decode(m.frames)
        assert reply is not None and reply.ok, reply
        assert fuzz_worker.poll() is None

        # Survived: the server answers a valid request correctly, through the real worker.
        time.sleep(1.0)
        assert server.poll() is None, log_path.read_text()[-3000:]
        assert worker.poll() is None
        ids = rng.integers(0, 50, (3, 9)).astype(np.int32)
        batch = SequenceBatch(ids[:, :5], np.ones((3, 5), np.int32), ids[:, 5:], np.ones((3, 4), np.int32))
        with TeacherClient(addr, timeout_s=10) as c:
            got = c.score(batch, top_k=4, temperature=1.0).result(60)
        from gold_jax.teacher.backends.base import scores_from_logits_np
        fb = FakeBackend()
        ref = scores_from_logits_np(fb.logits(batch.input_ids), batch.input_ids, top_k=4, temperature=1.0,
                                    completion_start=5, vocab_size=fb.vocab_size)
        np.testing.assert_array_equal(got.ids, ref.ids)
        np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=1e-6, atol=1e-6)

        growth = {"server": rss_mib(server.pid) - rss0["server"], "worker": rss_mib(worker.pid) - rss0["worker"],
                  "fuzzed worker": rss_mib(fuzz_worker.pid) - fuzz_rss0}
        total = n_front + n_back + n_tasks
        print(f"\nfuzz: {total} messages ({n_front} client->server, {n_back} worker->server, "
              f"{n_tasks} server->worker), {replies} client replies; RSS growth MiB: "
              + ", ".join(f"{k} {v:+.1f}" for k, v in growth.items()))
        assert total >= 5000
        assert replies >= n_front * 0.9   # nearly every message got an (error) reply, none crashed the server
        for k, v in growth.items():
            assert v < 50, f"{k} RSS grew by {v:.1f} MiB"
        text = log_path.read_text()
        assert "Traceback" not in text or "dropped after an error" in text
    finally:
        for s in socks:
            s.close(0)
        for p in (server, worker, fuzz_worker):
            if p is not None:
                p.kill()
                p.wait(10)

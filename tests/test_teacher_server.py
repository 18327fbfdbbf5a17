"""Teacher server + client over localhost with the fake backend: routing, batching, faults."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import msgpack
import numpy as np
import pytest
import zmq

from gold_jax.teacher import protocol as P
from gold_jax.teacher.client import TeacherClient, TeacherError
from gold_jax.teacher.server import TeacherServer
from gold_jax.teacher.worker import serve_worker
from gold_jax.types import SequenceBatch

sys.path.insert(0, os.path.dirname(__file__))
from teacher_fake import FAKE_FINGERPRINT, FakeBackend  # noqa: E402

FAKE_SCRIPT = os.path.join(os.path.dirname(__file__), "teacher_fake.py")


def make_batch(rng, b=3, p=5, r=4, vocab=50):
    pm = np.ones((b, p), np.int32)
    pm[0, :2] = 0                   # left padding
    cm = np.ones((b, r), np.int32)
    cm[-1, -1] = 0                  # right padding
    return SequenceBatch(rng.integers(0, vocab, (b, p)).astype(np.int32), pm,
                         rng.integers(0, vocab, (b, r)).astype(np.int32), cm)


def reference(backend, batch, top_k, temperature):
    from gold_jax.teacher.backends.base import scores_from_logits_np
    return scores_from_logits_np(backend.logits(batch.input_ids), batch.input_ids, top_k=top_k,
                                 temperature=temperature, completion_start=batch.completion_start,
                                 vocab_size=backend.vocab_size)


class Teacher:
    """In-process server thread and worker threads; workers can also be added as processes."""

    def __init__(self, n_workers=1, backend=None, **server_kw):
        server_kw.setdefault("heartbeat_timeout_s", 1.0)
        self.server = TeacherServer("127.0.0.1", 0, 0, **server_kw)
        self.thread = self.server.start_thread()
        self.backend = backend or FakeBackend()
        self.stops, self.threads, self.procs = [], [], []
        for _ in range(n_workers):
            self.add_thread_worker()

    def add_thread_worker(self):
        stop = threading.Event()
        t = threading.Thread(target=serve_worker, args=(self.backend, self.server.worker_address),
                             kwargs={"stop": stop, "heartbeat_s": 0.1}, daemon=True)
        t.start()
        self.stops.append(stop)
        self.threads.append(t)

    def add_process_worker(self, *args):
        p = subprocess.Popen([sys.executable, FAKE_SCRIPT, "--connect", self.server.worker_address, *args])
        self.procs.append(p)
        return p

    def close(self):
        for p in self.procs:
            p.kill()
            p.wait(10)
        for s in self.stops:
            s.set()
        self.server.stop()
        for t in [*self.threads, self.thread]:
            t.join(5)


@pytest.fixture(scope="module")
def teacher():
    t = Teacher(n_workers=2)
    yield t
    t.close()


def wait_for(cond, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.parametrize("top_k,temperature", [(5, 1.0), (16, 0.9), (0, 1.3)])
def test_score_matches_reference(teacher, top_k, temperature):
    batch = make_batch(np.random.default_rng(top_k))
    with TeacherClient(teacher.server.address, timeout_s=10) as c:
        got = c.score(batch, top_k=top_k, temperature=temperature).result(20)
    ref = reference(teacher.backend, batch, top_k, temperature)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.token_logprob, ref.token_logprob, rtol=1e-6, atol=1e-6)
    assert got.logprobs.shape[:2] == batch.completion_ids.shape
    if top_k:
        np.testing.assert_array_equal(got.ids, ref.ids)
        np.testing.assert_allclose(got.topk_logmass, ref.topk_logmass, rtol=1e-6, atol=1e-6)
        assert got.logprobs.dtype == np.float32 and got.ids.dtype == np.int32
    else:
        assert got.ids is None and got.topk_logmass is None
        assert got.logprobs.shape[-1] == teacher.backend.vocab_size


def test_info_ping_check_student(teacher):
    with TeacherClient(teacher.server.address, timeout_s=10) as c:
        assert c.ping()["pong"] is True
        info = c.info()
        assert info["vocab_size"] == 50 and info["tokenizer_fingerprint"] == FAKE_FINGERPRINT
        c.check_student(64, FAKE_FINGERPRINT)  # a larger (padded) student embedding is fine
        with pytest.raises(ValueError, match="different tokenizer"):
            c.check_student(50, "another-fingerprint")
        with pytest.raises(ValueError, match="smaller than the tokenizer size"):
            c.check_student(49, FAKE_FINGERPRINT)


def test_generate_roundtrip(teacher):
    ids = np.arange(6, dtype=np.int32).reshape(2, 3)
    with TeacherClient(teacher.server.address, timeout_s=10) as c:
        r = c.generate(ids, np.ones_like(ids), max_new_tokens=4, temperature=1.0, seed=2).result(20)
    np.testing.assert_array_equal(r.prompt_ids, ids)
    np.testing.assert_array_equal(r.completion_ids, (ids[:, -1:] + 3 + np.arange(4)) % 50)
    assert r.finish_reason.tolist() == [1, 1]


def test_bad_request_is_valueerror_and_server_keeps_serving(teacher):
    batch = make_batch(np.random.default_rng(0))
    bad = SequenceBatch(batch.prompt_ids, batch.prompt_mask, batch.completion_ids + 100, batch.completion_mask)
    with TeacherClient(teacher.server.address, timeout_s=10) as c:
        with pytest.raises(ValueError, match="token ids must be in"):
            c.score(bad, top_k=4, temperature=1.0).result(20)
        with pytest.raises(ValueError, match="top_k"):
            c.score(batch, top_k=17, temperature=1.0).result(20)
        with pytest.raises(ValueError, match="temperature"):
            c.score(batch, top_k=4, temperature=0.0).result(20)
        assert c.score(batch, top_k=4, temperature=1.0).result(20).ids.shape == (3, 4, 4)


def _raw_roundtrip(address, frames, timeout=10.0):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send_multipart(frames)
        assert sock.poll(timeout * 1000), "no reply from the server"
        return P.decode(sock.recv_multipart())
    finally:
        sock.close(0)


def test_malformed_oversized_and_random_bytes_get_error_replies():
    t = Teacher(n_workers=1, max_message_bytes=1 << 20)
    try:
        addr = t.server.address
        rng = np.random.default_rng(0)
        good = P.encode_request("ok1", "score", {"top_k": 3, "temperature": 1.0},
                                {"input_ids": np.zeros((1, 4), np.int32), "attention_mask": np.ones((1, 4), np.int32)})
        cases = {
            "random bytes": [rng.bytes(100)],
            "random frames": [rng.bytes(10), rng.bytes(33)],
            "not a map": [msgpack.packb([1, 2, 3])],
            "bad version": [msgpack.packb({"v": 99, "id": "x", "op": "ping"})],
            "unknown op": [msgpack.packb({"v": P.PROTOCOL_VERSION, "id": "x", "op": "rm -rf", "args": {}, "arrays": []})],
            "frame count": good[:1],
            "short array": [good[0], bytes(good[1])[:-4], good[2]],
            "pickle dtype": [msgpack.packb({"v": P.PROTOCOL_VERSION, "id": "x", "op": "score", "args": {},
                                            "arrays": [["input_ids", "object", [1]]]}), b"\x80\x04."],
            "oversized": [good[0], bytes(2 << 20), good[2]],
        }
        for name, frames in cases.items():
            rep = _raw_roundtrip(addr, frames)
            assert not rep.ok and rep.code in P.CLIENT_FAULTS, (name, rep.code, rep.error)
        assert _raw_roundtrip(addr, cases["bad version"]).code == P.ErrorCode.VERSION_MISMATCH
        assert "exceeds the limit" in _raw_roundtrip(addr, cases["oversized"]).error
        rep = _raw_roundtrip(addr, good)
        assert rep.ok and rep.arrays["ids"].shape == (1, 3, 3)
    finally:
        t.close()


def test_many_concurrent_clients_get_their_own_replies(teacher):
    rng = np.random.default_rng(1)
    batches = [make_batch(rng, b=int(rng.integers(1, 4))) for _ in range(24)]
    before = dict(teacher.server.stats)

    def one(i):
        with TeacherClient(teacher.server.address, timeout_s=10, max_in_flight=2) as c:
            futs = [c.score(batches[j], top_k=4, temperature=1.0) for j in range(i, 24, 6)]
            return [(j, f.result(30)) for j, f in zip(range(i, 24, 6), futs)]

    with ThreadPoolExecutor(6) as ex:
        results = [r for rs in ex.map(one, range(6)) for r in rs]
    assert len(results) == 24
    for j, got in results:
        ref = reference(teacher.backend, batches[j], 4, 1.0)
        np.testing.assert_array_equal(got.ids, ref.ids)
        np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=1e-6, atol=1e-6)
    s = teacher.server.stats
    # Concurrent requests with the same shape were merged into shared backend calls.
    assert s["batched_requests"] - before.get("batched_requests", 0) == 24
    assert s["tasks"] - before.get("tasks", 0) < 24


def test_worker_killed_mid_request_is_requeued():
    t = Teacher(n_workers=0)
    try:
        mark = os.path.join(t.server.__dict__.setdefault("_tmp", os.environ.get("TMPDIR", "/tmp")),
                            f"teacher-mark-{os.getpid()}-{time.monotonic_ns()}")
        slow = t.add_process_worker("--delay", "30", "--mark", mark)
        wait_for(lambda: len(t.server.workers) == 1, what="worker registration")
        batch = make_batch(np.random.default_rng(3))
        other = make_batch(np.random.default_rng(4), r=6)  # another length: a second task, not merged
        with TeacherClient(t.server.address, timeout_s=10, max_retries=3) as c:
            fut = c.score(batch, top_k=4, temperature=1.0)
            wait_for(lambda: os.path.exists(mark), what="the worker to start the request")
            fut2 = c.score(other, top_k=4, temperature=1.0)
            # prefetch: the second task waits in the busy worker, not in the server's queue
            wait_for(lambda: t.server.stats["tasks"] == 2, what="the second task to be prefetched")
            slow.kill()
            slow.wait(10)
            t.add_process_worker()  # a healthy worker joins the running server
            got, got2 = fut.result(30), fut2.result(30)
        np.testing.assert_array_equal(got.ids, reference(t.backend, batch, 4, 1.0).ids)
        np.testing.assert_array_equal(got2.ids, reference(t.backend, other, 4, 1.0).ids)
        assert t.server.stats["workers_lost"] == 1 and t.server.stats["requeued"] == 2
        os.remove(mark)
    finally:
        t.close()


def test_dead_server_raises_naming_the_address():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addr = f"tcp://127.0.0.1:{port}"
    with TeacherClient(addr, timeout_s=0.3, max_retries=2) as c:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=addr):
            c.score(make_batch(np.random.default_rng(0)), top_k=4, temperature=1.0).result(10)
        assert time.monotonic() - t0 < 5


def test_slow_worker_times_out_without_hanging():
    t = Teacher(n_workers=0)
    try:
        t.add_process_worker("--delay", "60")
        wait_for(lambda: len(t.server.workers) == 1, what="worker registration")
        with TeacherClient(t.server.address, timeout_s=0.5, max_retries=2) as c:
            t0 = time.monotonic()
            fut = c.score(make_batch(np.random.default_rng(0)), top_k=4, temperature=1.0)
            with pytest.raises(TimeoutError, match="3 attempts"):
                fut.result(15)
            assert time.monotonic() - t0 < 5
            assert c.ping()["pong"]  # the server itself still answers
        assert t.server.stats["dedup_running"] == 2  # retries joined the running request
    finally:
        t.close()


def test_server_restart_while_client_waits(tmp_path):
    import socket
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    code = ("import sys; from gold_jax.teacher.server import TeacherServer; "
            f"s = TeacherServer('127.0.0.1', {ports[0]}, {ports[1]}, heartbeat_timeout_s=1.0); s.serve()")
    procs = []
    try:
        server = subprocess.Popen([sys.executable, "-c", code])
        procs.append(server)
        mark = str(tmp_path / "mark")
        procs.append(subprocess.Popen([sys.executable, FAKE_SCRIPT, "--connect", f"tcp://127.0.0.1:{ports[1]}",
                                       "--delay", "1.5", "--mark", mark]))
        batch = make_batch(np.random.default_rng(5))
        with TeacherClient(f"tcp://127.0.0.1:{ports[0]}", timeout_s=2.0, max_retries=10) as c:
            fut = c.score(batch, top_k=4, temperature=1.0)
            wait_for(lambda: os.path.exists(mark), what="the worker to start the request")
            server.kill()
            server.wait(10)
            server = subprocess.Popen([sys.executable, "-c", code])
            procs.append(server)
            got = fut.result(60)
            assert c.stats["retries"] >= 1
            got2 = c.score(batch, top_k=4, temperature=1.0).result(30)
        ref = reference(FakeBackend(), batch, 4, 1.0)
        np.testing.assert_array_equal(got.ids, ref.ids)
        np.testing.assert_array_equal(got2.ids, ref.ids)
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


def test_queue_is_bounded():
    t = Teacher(n_workers=0, max_queue=2)
    try:
        batch = make_batch(np.random.default_rng(0))
        with TeacherClient(t.server.address, timeout_s=10, max_in_flight=4) as c:
            futs = [c.score(batch, top_k=4, temperature=1.0) for _ in range(3)]
            with pytest.raises(TeacherError, match="server busy"):
                futs[2].result(20)
            assert not futs[0].done()       # held until a worker registers
            t.add_thread_worker()
            for f in futs[:2]:
                assert f.result(20).ids.shape == (3, 4, 4)
    finally:
        t.close()


# ------------------------------------------------------------ wire robustness (issue 12 item 9)

def _header(**kw):
    h = {"v": P.PROTOCOL_VERSION, "id": "x1", "op": "score", "args": {"top_k": 3, "temperature": 1.0},
         "arrays": [["input_ids", "int32", [1, 4]], ["attention_mask", "int32", [1, 4]]]}
    h.update(kw)
    return msgpack.packb(h)


def test_unhashable_dtype_and_wrong_types_get_bad_request_replies(teacher):
    z = bytes(16)
    cases = {
        "list dtype": [_header(arrays=[["input_ids", ["int32"], [1, 4]], ["attention_mask", "int32", [1, 4]]]), z, z],
        "map dtype": [_header(arrays=[["input_ids", {"a": 1}, [1, 4]], ["attention_mask", "int32", [1, 4]]]), z, z],
        "map name": [_header(arrays=[[{"n": 1}, "int32", [1, 4]], ["attention_mask", "int32", [1, 4]]]), z, z],
        "map op": [_header(op={"score": 1}), z, z],
        "list id": [_header(id=["x"]), z, z],
        "map version": [_header(v={"1": 1}), z, z],
        "float top_k": [_header(args={"top_k": 3.5, "temperature": 1.0}), z, z],
        "nan temperature": [_header(args={"top_k": 3, "temperature": float("nan")}), z, z],
        "list temperature": [_header(args={"top_k": 3, "temperature": [1.0]}), z, z],
        "map completion_start": [_header(args={"top_k": 3, "temperature": 1.0, "completion_start": {}}), z, z],
        "args list": [_header(args=[1]), z, z],
        "negative shape": [_header(arrays=[["input_ids", "int32", [-1, 4]], ["attention_mask", "int32", [1, 4]]]),
                           z, z],
        "huge shape": [_header(arrays=[["input_ids", "int32", [1 << 40, 4]], ["attention_mask", "int32", [1, 4]]]),
                       z, z],
    }
    for name, frames in cases.items():
        rep = _raw_roundtrip(teacher.server.address, frames)
        assert not rep.ok and rep.code in P.CLIENT_FAULTS, (name, rep.error)
    assert teacher.thread.is_alive()
    good = P.encode_request("after", "score", {"top_k": 3, "temperature": 1.0},
                            {"input_ids": np.zeros((1, 4), np.int32), "attention_mask": np.ones((1, 4), np.int32)})
    assert _raw_roundtrip(teacher.server.address, good).ok


def test_protocol_decoders_raise_only_protocol_errors():
    """Every message kind: wrong types in every field give ProtocolError, never TypeError/KeyError."""
    bad_fields = [None, True, -1, 1 << 62, 1.5, float("nan"), "s", b"b", [], [1, [2]], {}, {"k": [1]}]
    reply = {"v": P.PROTOCOL_VERSION, "id": "r", "ok": False, "code": "busy", "error": "e", "meta": {}, "arrays": []}
    request = {"v": P.PROTOCOL_VERSION, "id": "r", "op": "ping", "args": {}, "arrays": []}
    for base in (reply, request):
        for key in base:
            for v in bad_fields:
                try:
                    P.decode([msgpack.packb({**base, key: v})])
                except P.ProtocolError:
                    pass
    for kind, extra in [("ready", {"v": P.PROTOCOL_VERSION, "info": {}}), ("hb", {}), ("reply", {})]:
        for key in ["type", *extra]:
            for v in bad_fields:
                try:
                    P.decode_worker_message([msgpack.packb({"type": kind, **extra, key: v}), b"x"])
                except P.ProtocolError:
                    pass
    for kind, extra in [("task", {"n_frames": [1]}), ("who", {}), ("reject", {"error": "e"})]:
        for key in ["type", *extra]:
            for v in bad_fields:
                try:
                    P.decode_server_message([msgpack.packb({"type": kind, **extra, key: v}), b"x"])
                except P.ProtocolError:
                    pass
    with pytest.raises(P.ProtocolError) as e:
        P.decode([msgpack.packb({**reply, "v": P.PROTOCOL_VERSION + 1})])
    assert e.value.code == P.ErrorCode.VERSION_MISMATCH


class FakeServer:
    """A ROUTER that answers each request with `respond(header) -> list of frames | None`."""

    def __init__(self, respond):
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.respond, self.stop = respond, threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            if self.sock.poll(50):
                ident, *frames = self.sock.recv_multipart()
                out = self.respond(msgpack.unpackb(frames[0]))
                if out is not None:
                    self.sock.send_multipart([ident, *out])

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close(0)


def test_malformed_replies_fail_the_future_and_the_client_keeps_working():
    def respond(h):
        if h["op"] == "ping":   # a valid reply: the client still works afterwards
            return P.encode_reply(h["id"], meta={"pong": True, "workers": 1})
        if h["op"] == "info":   # a server of another protocol version
            return P.encode_reply(h["id"], meta={"protocol_version": P.PROTOCOL_VERSION + 1})
        if h["args"]["top_k"] == 1:  # unhashable dtype in the reply (the crash of issue 12)
            return [msgpack.packb({"v": P.PROTOCOL_VERSION, "id": h["id"], "ok": True, "meta": {},
                                   "arrays": [["logprobs", ["float32"], [1]]]}), b"\0" * 4]
        if h["args"]["top_k"] == 2:  # garbage without an id, then nothing
            return [b"\xc1garbage"]
        return [msgpack.packb({"v": P.PROTOCOL_VERSION, "id": h["id"], "ok": False, "code": {"x": 1}, "error": 5})]

    fake = FakeServer(respond)
    batch = make_batch(np.random.default_rng(0))
    try:
        with TeacherClient(fake.address, timeout_s=0.5, max_retries=1) as c:
            with pytest.raises(TeacherError, match="malformed reply"):
                c.score(batch, top_k=1, temperature=1.0).result(10)
            with pytest.raises(TeacherError, match="malformed reply"):
                c.score(batch, top_k=3, temperature=1.0).result(10)
            with pytest.raises(TimeoutError):   # unattributable garbage: dropped, the request times out
                c.score(batch, top_k=2, temperature=1.0).result(10)
            with pytest.raises(ValueError, match=f"protocol version {P.PROTOCOL_VERSION + 1}"):
                c.info()
            assert c.ping()["pong"] is True
            assert c.stats["bad_replies"] >= 3 and c._thread.is_alive()
    finally:
        fake.close()


def test_dead_io_loop_fails_pending_futures_and_restarts(teacher):
    batch = make_batch(np.random.default_rng(0))
    with TeacherClient(teacher.server.address, timeout_s=10) as c:
        def broken_send(sock, req):
            raise RuntimeError("simulated I/O failure")
        c._send = broken_send   # the loop calls self._send: make it fail once per request
        fut = c.score(batch, top_k=4, temperature=1.0)
        with pytest.raises(ConnectionError, match="simulated I/O failure"):
            fut.result(10)      # failed, not left hanging: resolve() can re-send it
        del c._send
        assert c.score(batch, top_k=4, temperature=1.0).result(20).ids.shape == (3, 4, 4)
        assert c.stats["io_failures"] >= 1


def test_server_module_does_not_import_its_cli():
    code = ("import sys, gold_jax.teacher.server, gold_jax.teacher.worker, gold_jax.teacher.client; "
            "bad = [m for m in ('gold_jax.teacher.cli', 'gold_jax.teacher.__main__') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    src = open(os.path.join(os.path.dirname(P.__file__), "server.py")).read()
    assert "teacher.cli" not in src and "import cli" not in src


def _run_cli(args, env=None, timeout=120):
    base = {k: v for k, v in os.environ.items() if k != "GOLD_JAX_TRACEBACK"}
    env = {**base, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_expected_errors_are_one_line(tmp_path):
    missing = str(tmp_path / "no-such-model")
    for args in (["gold_jax.teacher", "--model", missing, "--port", "0", "--worker-port", "0"],
                 ["gold_jax.teacher.worker", "--model", missing]):
        out = _run_cli(args)
        assert out.returncode == 2, out.stderr
        assert f"error: --model {missing!r} is not a directory" in out.stderr
        assert "Traceback" not in out.stderr
    out = _run_cli(["gold_jax.teacher.worker", "--model", missing], env={"GOLD_JAX_TRACEBACK": "1"})
    assert out.returncode != 0 and "Traceback" in out.stderr
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = _run_cli(["gold_jax.teacher.status", "--address", f"tcp://127.0.0.1:{port}"])
    assert out.returncode == 2 and out.stderr.startswith("error: teacher check failed"), out.stderr
    assert "Traceback" not in out.stderr


def test_server_exit_status_and_cause_are_logged(tmp_path):
    empty = tmp_path / "empty-model"   # a directory without a model: the local worker fails
    empty.mkdir()
    out = _run_cli(["gold_jax.teacher", "--model", str(empty), "--port", "0", "--worker-port", "0",
                    "--workers", "1"], timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "all 1 local workers exited" in out.stderr and "exit status 1" in out.stderr
    assert "error: " in out.stderr   # the worker's own one-line error is in the log too
    proc = subprocess.Popen([sys.executable, "-m", "gold_jax.teacher", "--model", "-", "--workers", "0",
                             "--port", "0", "--worker-port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()          # "teacher server on ..." once it is serving
        assert "teacher server on" in line, line
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + 15 and "received SIGTERM" in err, err


def test_worker_survives_malformed_tasks_and_server_rejects_bad_workers(teacher):
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    addr = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    stop = threading.Event()
    t = threading.Thread(target=serve_worker, args=(FakeBackend(), addr), kwargs={"stop": stop, "heartbeat_s": 0.1},
                         daemon=True)
    t.start()
    try:
        assert router.poll(10_000)
        wid, ready = router.recv_multipart()
        assert P.decode_worker_message([ready]).kind == "ready"
        unhashable = [msgpack.packb({"v": P.PROTOCOL_VERSION, "id": "u", "op": "score", "args": {"top_k": 3, "temperature": 1.0},
                                     "arrays": [["input_ids", ["int32"], [1, 4]]]}), bytes(16)]
        for bad in ([b"\xc1"], [msgpack.packb({"type": "task", "n_frames": [{"a": 1}]}), b"x"],
                    [msgpack.packb({"type": "task", "n_frames": [5]}), b"x"], [msgpack.packb({"type": ["task"]})]):
            router.send_multipart([wid, *bad])          # dropped and logged
        router.send_multipart([wid, *P.encode_task([unhashable])])
        ids = np.zeros((1, 4), np.int32)
        router.send_multipart([wid, *P.encode_task([P.encode_request("good", "score", {"top_k": 3, "temperature": 1.0},
                                                                     {"input_ids": ids,
                                                                      "attention_mask": np.ones_like(ids)})])])
        replies = {}
        deadline = time.monotonic() + 20
        while len(replies) < 2 and time.monotonic() < deadline:
            if router.poll(1000):
                _, *frames = router.recv_multipart()
                m = P.decode_worker_message(frames)
                if m.kind == "reply":
                    r = P.decode(m.frames)
                    replies[r.id] = r
        assert not replies["u"].ok and replies["u"].code == P.ErrorCode.BAD_REQUEST
        assert replies["good"].ok and replies["good"].arrays["ids"].shape == (1, 3, 3)
        assert t.is_alive()
    finally:
        stop.set()
        t.join(5)
        router.close(0)
    # The server side: a worker whose info has wrong types is rejected, the server keeps serving.
    back = zmq.Context.instance().socket(zmq.DEALER)
    back.setsockopt(zmq.LINGER, 0)
    back.connect(teacher.server.worker_address)
    try:
        info = {**FakeBackend().info(), "vocab_size": [50]}
        back.send(msgpack.packb({"type": "ready", "v": P.PROTOCOL_VERSION, "info": info}))
        assert back.poll(10_000)
        m = P.decode_server_message(back.recv_multipart())
        assert m.kind == "reject" and "vocab_size" in m.error
        back.send(msgpack.packb({"type": "ready", "v": 99, "info": FakeBackend().info()}))
        assert back.poll(10_000)
        m = P.decode_server_message(back.recv_multipart())
        assert m.kind == "reject" and "protocol version 99" in m.error
    finally:
        back.close(0)
    with TeacherClient(teacher.server.address, timeout_s=10) as c:
        assert c.ping()["workers"] == 2

"""The jax teacher backend behind the server: scores equal the model's own, padded vocabularies, start-up checks."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from gold_jax.fingerprint import tokenizer_fingerprint, tokenizer_size
from gold_jax.models.config import ModelConfig
from gold_jax.models.decoder import Decoder
from gold_jax.models.hf_io import save_pretrained
from gold_jax.teacher import TeacherClient, start_local_teacher
from gold_jax.teacher.backends.base import scores_from_logits_np
from gold_jax.teacher.backends.jax_backend import JaxBackend
from gold_jax.types import SequenceBatch
from tiny_tokenizer import tiny_corpus, tiny_tokenizer, tiny_tokenizer_dir

EMBED = 576  # embedding rows beyond the tokenizer's 512 ids, like Qwen's 151936 vs 152064


def tiny_model(embed=EMBED, seed=0):
    cfg = ModelConfig(architecture="llama", vocab_size=embed, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=128)
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    # Make the padding rows the most likely tokens, so returning one would show.
    w = np.array(model.lm_head[...])
    w[:, tokenizer_size(tiny_tokenizer()):] = 5.0
    model.lm_head.value = w
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teacher"))
    save_pretrained(tiny_model(), path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def served(model_dir):
    backend = JaxBackend.from_pretrained(model_dir)
    with start_local_teacher(None, backend=backend, workers=1, heartbeat_timeout_s=30.0) as t:
        yield backend, t


def make_batch(rng, vocab, b=3, p=6, r=5):
    pm = np.ones((b, p), np.int32)
    pm[0, :3] = 0
    cm = np.ones((b, r), np.int32)
    cm[1, -2:] = 0
    return SequenceBatch(rng.integers(0, vocab, (b, p)).astype(np.int32), pm,
                         rng.integers(0, vocab, (b, r)).astype(np.int32), cm)


@pytest.mark.parametrize("top_k,temperature", [(8, 0.9), (0, 1.0)])
def test_server_scores_equal_the_models_own(served, top_k, temperature):
    backend, t = served
    vocab = backend.info()["vocab_size"]
    batch = make_batch(np.random.default_rng(top_k), vocab)
    logits = np.asarray(backend.model(batch.input_ids, batch.attention_mask))
    assert logits.shape[-1] == EMBED and logits[..., vocab:].max() > logits[..., :vocab].max() - 1
    ref = scores_from_logits_np(logits, batch.input_ids, top_k=top_k, temperature=temperature,
                                completion_start=batch.completion_start, vocab_size=vocab)
    tok = tiny_tokenizer()
    with TeacherClient(t.address, timeout_s=120, student_vocab_size=EMBED + 64,
                       tokenizer_fingerprint=tokenizer_fingerprint(tok)) as c:
        got = c.score(batch, top_k=top_k, temperature=temperature).result(300)
    R = batch.completion_ids.shape[1]
    np.testing.assert_allclose(got.token_logprob, ref.token_logprob, atol=2e-5, rtol=1e-5)
    if top_k:
        assert got.ids.shape == (3, R, top_k) and got.ids.max() < vocab   # padding ids never returned
        np.testing.assert_array_equal(got.ids, ref.ids)
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(got.topk_logmass, ref.topk_logmass, atol=2e-5, rtol=1e-5)
    else:
        assert got.logprobs.shape == (3, R, vocab)       # full rows over the tokenizer's ids only
        np.testing.assert_allclose(np.exp(got.logprobs.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=2e-5, rtol=1e-5)


def test_topk_logmass_is_exact_near_one(served):
    """With a near-deterministic teacher the top-k mass is ~1; its log must still be exact (not 0 or > 0)."""
    backend, _ = served
    vocab = backend.info()["vocab_size"]
    batch = make_batch(np.random.default_rng(1), vocab)
    s = backend.score(batch.input_ids, batch.attention_mask, top_k=64, temperature=0.05,
                      completion_start=batch.completion_start)
    logits = np.asarray(backend.model(batch.input_ids, batch.attention_mask))
    ref = scores_from_logits_np(logits, batch.input_ids, top_k=64, temperature=0.05,
                                completion_start=batch.completion_start, vocab_size=vocab)
    assert (s.topk_logmass <= 0).all()
    np.testing.assert_allclose(s.topk_logmass, ref.topk_logmass, atol=1e-6)


def test_client_checks_the_tokenizer_at_start_up(served, tmp_path):
    _, t = served
    other = __import__("gold_jax.data", fromlist=["train_tokenizer"]).train_tokenizer(
        tiny_corpus(50, seed=7), 300)
    with pytest.raises(ValueError, match="different tokenizer"):
        TeacherClient(t.address, timeout_s=60, student_vocab_size=300,
                      tokenizer_fingerprint=tokenizer_fingerprint(other))
    with pytest.raises(ValueError, match="smaller than the tokenizer size"):
        TeacherClient(t.address, timeout_s=60, student_vocab_size=100,
                      tokenizer_fingerprint=tokenizer_fingerprint(tiny_tokenizer()))
    # Same tokenizer, an embedding padded to a different size than the teacher's: accepted.
    with TeacherClient(t.address, timeout_s=60, student_vocab_size=512,
                       tokenizer_fingerprint=tokenizer_fingerprint(tiny_tokenizer())) as c:
        assert c.teacher_info["vocab_size"] == 512 and c.teacher_info["embedding_size"] == EMBED


def test_generate_through_the_server(served):
    backend, t = served
    ids = np.array([[5, 6, 7], [0, 8, 9]], np.int32)
    mask = np.array([[1, 1, 1], [0, 1, 1]], np.int32)
    with TeacherClient(t.address, timeout_s=120) as c:
        r = c.generate(ids, mask, max_new_tokens=4, temperature=0.0, seed=0).result(300)
    np.testing.assert_array_equal(r.prompt_ids, ids)
    assert r.completion_ids.shape == (2, 4) and r.completion_ids.max() < backend.info()["vocab_size"]


def _alive(pid: str) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_start_teacher_script(model_dir, tmp_path):
    """launch/start_teacher.sh starts server + 2 workers, waits for them and verifies with a score."""
    import socket
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PORT": str(ports[0]), "WORKER_PORT": str(ports[1]), "WORKERS": "2",
           "LOG_DIR": str(tmp_path), "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = subprocess.run(["bash", os.path.join(root, "launch", "start_teacher.sh"), model_dir], env=env,
                         capture_output=True, text=True, timeout=600)
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        assert "2 worker(s)" in out.stdout and "python -m gold_jax.teacher.status" in out.stdout
        check = subprocess.run([sys.executable, "-m", "gold_jax.teacher.status", "--address",
                                f"tcp://127.0.0.1:{ports[0]}", "--workers", "2", "--score",
                                "--tokenizer", tiny_tokenizer_dir()], capture_output=True, text=True,
                               timeout=600, env=env)
        assert check.returncode == 0 and "fingerprint matches" in check.stdout, check.stdout + check.stderr
        assert "score ok" in check.stdout
        # Workers do not outlive a server that is killed outright (no orphans holding the accelerator).
        pid = int((tmp_path / "teacher_server.pid").read_text())
        workers = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        os.kill(pid, 9)
        deadline = time.monotonic() + 20
        while any(_alive(w) for w in workers):
            assert time.monotonic() < deadline, "local workers outlived the killed server"
            time.sleep(0.2)
    finally:
        pid_file = tmp_path / "teacher_server.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text())
            subprocess.run(["kill", str(pid)])
            for _ in range(100):
                if subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode:
                    break
                time.sleep(0.1)


def test_bfloat16_teacher_has_bf16_params_and_close_scores(served, model_dir):
    """teacher.dtype=bfloat16: weights (not only compute) in bf16; scores within bf16 error of float32's."""
    import jax
    from gold_jax.teacher.backends import make_backend
    f32, _ = served
    bf16 = make_backend("jax", model_dir, dtype="bfloat16")
    params = jax.tree.leaves(nnx.state(bf16.model, nnx.Param))
    assert params and all(p.dtype == jax.numpy.bfloat16 for p in params)
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(nnx.state(f32.model, nnx.Param)))
    vocab = f32.info()["vocab_size"]
    batch = make_batch(np.random.default_rng(7), vocab)
    kw = dict(top_k=0, temperature=1.0, completion_start=batch.completion_start)
    a = f32.score(batch.input_ids, batch.attention_mask, **kw)
    b = bf16.score(batch.input_ids, batch.attention_mask, **kw)
    assert b.logprobs.dtype == np.float32   # scores travel as float32 whatever the compute dtype
    assert not np.array_equal(a.logprobs, b.logprobs)   # it really ran in bf16
    np.testing.assert_allclose(b.logprobs, a.logprobs, atol=0.05)
    p, q = np.exp(a.logprobs.astype(np.float64)), np.exp(b.logprobs.astype(np.float64))
    assert float(np.abs(p - q).sum(-1).max()) < 0.05   # total variation between the two teachers
    # auto = float32 on CPU
    assert make_backend("jax", model_dir, dtype="auto").model.config.dtype == "float32"

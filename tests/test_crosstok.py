"""Cross-tokenizer distillation (issue 15): byte alignment, shared vocabulary, ULD and hybrid losses.

Tokenizers are trained here by the `tokenizers` library on one small corpus
(no downloads): two byte-level BPEs with different vocab sizes (so different
merges), one byte-fallback BPE (sentencepiece style) and one byte-level BPE
without the chat-template special tokens. Losses are checked against float64
NumPy references written from the formulas, gradients against central finite
differences of those references.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gold_jax.crosstok.align import align, align_offsets, span_arrays, teacher_ids_for, token_bytes
from gold_jax.crosstok.vocab_map import shared_vocab
from gold_jax.losses import generalized_jsd, topk_jsd
from gold_jax.losses.uld import (hybrid_full_terms, hybrid_topk_terms, hybrid_weights, span_logscale,
                                 uld_topk_terms)

CORPUS = ["Hello world, the quick brown fox jumps over the lazy dog.", "数学 是 科学 的 语言。",
          "emoji 🙂🚀 party time", "a   b\t\tc\n\nd  e", "<|im_start|>user\nhi there<|im_end|>",
          "numbers 12345 and 678"] * 20
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
TEXTS = {
    "ascii": "Hello world, the quick brown fox.",
    "cjk": "数学 是 科学的语言。",
    "emoji": "party 🙂🚀 time 🎉",
    "whitespace": "a   b\t\tc\n\n\nd    e ",
    "chat": "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n12345<|im_end|>",
    "split_char": "price: 5€, naïve café ß",  # €, ï, é, ß are absent from the corpus: split into byte tokens
}


def byte_level(vocab: int, special=SPECIAL) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=list(special), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def byte_fallback(vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIAL + byte_tokens, limit_alphabet=60, show_progress=False))
    return tok


@pytest.fixture(scope="module")
def toks():
    return {"bl300": byte_level(300), "bl420": byte_level(420), "bf": byte_fallback(420),
            "bl_nospecial": byte_level(380, special=())}


PAIRS = [("bl300", "bl420"), ("bl420", "bl300"), ("bl300", "bf"), ("bf", "bl420"), ("bl300", "bl_nospecial")]


def _span_text(tok, ids):
    return tok.decode(list(ids), skip_special_tokens=False)


# ---------------------------------------------------------------- alignment
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("name", list(TEXTS))
def test_alignment_spans_redecode_to_same_text(toks, pair, name):
    s_tok, t_tok = toks[pair[0]], toks[pair[1]]
    text = TEXTS[name]
    sid = s_tok.encode(text, add_special_tokens=False).ids
    tid = teacher_ids_for(t_tok, s_tok, sid)
    al = align(s_tok, sid, t_tok, tid)
    raw = text.encode("utf-8")
    assert al.unaligned_frac == 0.0 and al.spans
    # Spans tile both token streams and the text, in order, with no gap.
    assert al.spans[0][0] == 0 and al.spans[0][2] == 0 and al.spans[0][4] == 0
    assert al.spans[-1][1] == len(sid) and al.spans[-1][3] == len(tid) and al.spans[-1][5] == len(raw)
    for (s0, s1, t0, t1, b0, b1), nxt in zip(al.spans, al.spans[1:] + ((None,) * 6,)):
        assert s1 > s0 and t1 > t0
        piece = raw[b0:b1].decode("utf-8")
        assert _span_text(s_tok, sid[s0:s1]) == piece == _span_text(t_tok, tid[t0:t1])
        if nxt[0] is not None:
            assert (nxt[0], nxt[2], nxt[4]) == (s1, t1, b1)


def test_split_character_has_no_inner_boundary(toks):
    """A token that ends inside a UTF-8 character gets no boundary, on byte-level and byte-fallback sides."""
    text = TEXTS["split_char"]
    for name in ("bl300", "bf"):
        tok = toks[name]
        ids = tok.encode(text, add_special_tokens=False).ids
        tb = token_bytes(tok, ids)
        assert tb.text == text
        assert np.any(tb.ends < 0), f"{name}: expected a character split across byte tokens"
        valid = tb.ends[tb.ends >= 0]
        assert np.all(np.diff(valid) >= 0)
        raw = text.encode("utf-8")
        for e in valid:  # every boundary is a character boundary
            raw[:e].decode("utf-8")
    bf_tokens = toks["bf"].encode("€").tokens
    assert all(t.startswith("<0x") for t in bf_tokens) and len(bf_tokens) == 3


def test_special_token_aligns_with_its_pieces(toks):
    """A chat marker that is one special token on one side and several pieces on the other forms one span."""
    s_tok, t_tok = toks["bl300"], toks["bl_nospecial"]
    text = TEXTS["chat"]
    sid = s_tok.encode(text, add_special_tokens=False).ids
    tid = teacher_ids_for(t_tok, s_tok, sid)
    al = align(s_tok, sid, t_tok, tid)
    marker = s_tok.token_to_id("<|im_start|>")
    span = next(sp for sp in al.spans if sp[1] - sp[0] == 1 and sid[sp[0]] == marker)
    assert span[3] - span[2] > 1 and _span_text(t_tok, tid[span[2]:span[3]]) == "<|im_start|>"


def test_different_texts_are_counted_unaligned(toks):
    s_tok, t_tok = toks["bl300"], toks["bl420"]
    sid = s_tok.encode("the quick brown fox", add_special_tokens=False).ids
    tid = t_tok.encode("the quick red dog", add_special_tokens=False).ids
    al = align(s_tok, sid, t_tok, tid)
    assert 0 < al.n_unaligned_student < len(sid) and al.unaligned_frac > 0
    assert al.spans[-1][5] <= len("the quick ".encode())
    for s0, s1, t0, t1, b0, b1 in al.spans:
        assert _span_text(s_tok, sid[s0:s1]) == _span_text(t_tok, tid[t0:t1])


def test_align_offsets_rules():
    # student: [0,3) [3,5) [5,9)  teacher: [0,2) [2,5) [5,7) mid-char [7,9)  -> spans at 5 and 9.
    al = align_offsets(np.array([3, 5, 9]), np.array([2, 5, -1, 9]), 9)
    assert al.spans == ((0, 2, 0, 2, 0, 5), (2, 3, 2, 4, 5, 9))
    # a boundary beyond the common text is not used: the last tokens stay unaligned.
    al = align_offsets(np.array([3, 5, 9]), np.array([3, 5, 9]), 7)
    assert al.spans[-1][5] == 5 and al.n_unaligned_student == 1


def test_span_arrays_observed_and_bayesian():
    al = align_offsets(np.array([3, 5, 9]), np.array([2, 5, -1, 9]), 9)
    obs, bay = span_arrays(al, "observed"), span_arrays(al, "bayesian")
    np.testing.assert_array_equal(obs.base, [True, False, True])
    np.testing.assert_array_equal(bay.base, [False, True, True])
    np.testing.assert_array_equal(obs.span_id, [0, 0, 1])
    np.testing.assert_array_equal(obs.teacher_base, [0, -1, 2])
    np.testing.assert_array_equal(bay.teacher_base, [-1, 1, 3])
    assert obs.teacher_scalar_pos == ((1,), (3,)) and bay.teacher_scalar_pos == ((0,), (2,))
    with pytest.raises(ValueError, match="uld_token_merge_strategy"):
        span_arrays(al, "mean")


# ---------------------------------------------------------------- vocabulary map
def test_vocab_map(toks):
    a, b = toks["bl300"], toks["bl420"]
    vm = shared_vocab(a, b)
    sv, tv = a.get_vocab(with_added_tokens=True), b.get_vocab(with_added_tokens=True)
    inv_s = {i: s for s, i in sv.items()}
    for string, t_id in tv.items():
        s_id = vm.teacher_to_student[t_id]
        assert (s_id >= 0) == (string in sv)
        if s_id >= 0:
            assert inv_s[int(s_id)] == string and vm.student_shared[s_id]
    assert vm.student_shared.sum() == vm.n_matched < len(tv)
    same = shared_vocab(a, a)
    np.testing.assert_array_equal(same.teacher_to_student, np.arange(len(sv)))
    assert same.adaptive_weights() == (1.0, 0.0)
    np.testing.assert_array_equal(vm.map_ids(np.array([[-1, 10_000]])), [[-1, -1]])


def test_hybrid_weights_rules():
    assert hybrid_weights(30, 120, None, None) == (0.25, 0.75)
    assert hybrid_weights(30, 120, 0.6, 0.4) == (0.6, 0.4)
    with pytest.raises(ValueError, match="uld_hybrid_matched_weight"):
        hybrid_weights(30, 120, 0.6, None)


# ---------------------------------------------------------------- NumPy float64 references
def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_jsd_terms(p, q, beta):
    """Elementwise generalized-JSD terms from probabilities (P teacher, Q student), 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if beta == 0.0:
            t = p * (np.log(p) - np.log(q))
        elif beta == 1.0:
            t = q * (np.log(q) - np.log(p))
        else:
            m = beta * p + (1 - beta) * q
            t = beta * p * (np.log(p) - np.log(m)) + (1 - beta) * q * (np.log(q) - np.log(m))
    return np.nan_to_num(t)


def ref_uld_topk(q, tk, ttail, sscale, tscale):
    """Sorted L1 of the k largest of each side plus |teacher tail - student tail|, rows scaled."""
    k = tk.shape[-1]
    qs = -np.sort(-q, axis=-1)
    s_top, s_tail = qs[..., :k] * sscale[..., None], qs[..., k:].sum(-1) * sscale
    t_top = -np.sort(-tk, axis=-1) * tscale[..., None]
    return np.abs(t_top - s_top).sum(-1) + np.abs(ttail * tscale - s_tail)


def ref_hybrid_topk(q, tk, ttail, t2s_k, shared, beta, wm, wu, sscale, tscale):
    out = np.zeros(q.shape[:-1])
    for idx in np.ndindex(*q.shape[:-1]):
        qi, pk, ids = q[idx] * sscale[idx], tk[idx] * tscale[idx], t2s_k[idx]
        m = ids >= 0
        jsd = np_jsd_terms(pk[m], qi[ids[m]], beta).sum()
        p_rest = ttail[idx] * tscale[idx] + pk[~m].sum()
        q_rest = sscale[idx] - qi[ids[m]].sum()
        jsd += np_jsd_terms(np.array([p_rest]), np.array([q_rest]), beta).sum()
        n_u = int((~m).sum())
        t_u = -np.sort(-pk[~m])
        s_u = -np.sort(-qi[~shared])[:n_u]
        uld = np.abs(t_u - s_u).sum()
        out[idx] = wm * jsd + wu * uld
    return out


def ref_hybrid_full(q, p, t2s, shared, beta, wm, wu):
    m = t2s >= 0
    jsd = np_jsd_terms(p[..., m], q[..., t2s[m]], beta).sum(-1)
    t_u, s_u = -np.sort(-p[..., ~m], axis=-1), -np.sort(-q[..., ~shared], axis=-1)
    n = max(t_u.shape[-1], s_u.shape[-1])
    pad = lambda x: np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])  # noqa: E731
    return wm * jsd + wu * np.abs(pad(t_u) - pad(s_u)).sum(-1)


VS, VT, K, TEMP = 40, 56, 6, 0.9


def make_cross_case(seed, shared_n=24):
    """Student logits [2, 3, VS], teacher probs [2, 3, VT], a random injective shared map of shared_n tokens."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(2, 3, VS)) * 2.0
    t = rng.normal(size=(2, 3, VT)) * 2.0
    t2s = np.full(VT, -1, np.int64)
    t2s[rng.choice(VT, shared_n, replace=False)] = rng.choice(VS, shared_n, replace=False)
    shared = np.zeros(VS, bool)
    shared[t2s[t2s >= 0]] = True
    p = np.exp(np_log_softmax(t / TEMP))
    tid = np.argsort(-p, axis=-1)[..., :K]
    tk = np.take_along_axis(p, tid, -1)
    ttail = 1.0 - tk.sum(-1)
    sscale = np.exp(rng.uniform(-1.5, 0.0, size=(2, 3)))  # span products (merged rows)
    tscale = np.exp(rng.uniform(-1.5, 0.0, size=(2, 3)))
    return s, p, tid, tk, ttail, t2s, shared, sscale, tscale


def fd_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        g[i] = (f(xp) - f(xm)) / (2 * eps)
    return g


def test_uld_topk_value_and_grad():
    s, p, tid, tk, ttail, t2s, shared, ss, ts = make_cross_case(0)
    lm = np.log(tk.sum(-1))
    with jax.enable_x64(True):
        def loss(logits):
            logq = jax.nn.log_softmax(logits / TEMP, axis=-1)
            return uld_topk_terms(logq, jnp.log(tk), jnp.asarray(lm), student_logscale=jnp.log(ss),
                                  teacher_logscale=jnp.log(ts))
        got = np.asarray(loss(jnp.asarray(s)))
        grad = np.asarray(jax.grad(lambda x: jnp.sum(loss(x)))(jnp.asarray(s)))
    ref_f = lambda x: ref_uld_topk(np.exp(np_log_softmax(x / TEMP)), tk, ttail, ss, ts)  # noqa: E731
    np.testing.assert_allclose(got, ref_f(s), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad, fd_grad(lambda x: ref_f(x).sum(), s), rtol=1e-5, atol=1e-7)


def test_uld_full_k_is_trl_sorted_l1():
    """k = V_t: the top-k ULD is TRL's full sorted L1 (vocabularies zero-padded to a common size)."""
    s, p, *_ = make_cross_case(1)
    q = np.exp(np_log_softmax(s / TEMP))
    ref = np.abs(-np.sort(-p, -1) - np.pad(-np.sort(-q, -1), [(0, 0), (0, 0), (0, VT - VS)])).sum(-1)
    with jax.enable_x64(True):
        logq = jnp.pad(jnp.log(jnp.asarray(q)), [(0, 0), (0, 0), (0, VT - VS)], constant_values=-jnp.inf)
        got = uld_topk_terms(jnp.maximum(logq, -1e30), jnp.log(jnp.asarray(p)), jnp.zeros((2, 3)))
    # The teacher's tail bucket is floored at a mass of ~1e-6 (core.LOGMASS_MAX), as in the top-k JSD.
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1.01e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_hybrid_topk_value_and_grad(beta):
    s, p, tid, tk, ttail, t2s, shared, ss, ts = make_cross_case(2 + int(10 * beta))
    t2s_k = t2s[tid]
    assert (t2s_k >= 0).any() and (t2s_k < 0).any()
    wm, wu = hybrid_weights(int((t2s >= 0).sum()), VT, None, None)
    lm = np.log(tk.sum(-1))
    with jax.enable_x64(True):
        def loss(logits):
            logq = jax.nn.log_softmax(logits / TEMP, axis=-1)
            return hybrid_topk_terms(logq, jnp.log(tk), jnp.asarray(t2s_k), jnp.asarray(shared), jnp.asarray(lm),
                                     beta=beta, matched_weight=wm, unmatched_weight=wu,
                                     student_logscale=jnp.log(ss), teacher_logscale=jnp.log(ts))[0]
        got = np.asarray(loss(jnp.asarray(s)))
        grad = np.asarray(jax.grad(lambda x: jnp.sum(loss(x)))(jnp.asarray(s)))
    ref_f = lambda x: ref_hybrid_topk(np.exp(np_log_softmax(x / TEMP)), tk, ttail, t2s_k, shared,  # noqa: E731
                                      beta, wm, wu, ss, ts)
    np.testing.assert_allclose(got, ref_f(s), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(grad, fd_grad(lambda x: ref_f(x).sum(), s), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weights", [(None, None), (0.7, 0.3)])
def test_hybrid_full_value_and_grad(weights):
    s, p, _, _, _, t2s, shared, _, _ = make_cross_case(5)
    wm, wu = hybrid_weights(int((t2s >= 0).sum()), VT, *weights)
    with jax.enable_x64(True):
        def loss(logits):
            logq = jax.nn.log_softmax(logits / TEMP, axis=-1)
            return hybrid_full_terms(logq, jnp.log(jnp.asarray(p)), jnp.asarray(t2s), jnp.asarray(shared),
                                     beta=0.5, matched_weight=wm, unmatched_weight=wu)[0]
        got = np.asarray(loss(jnp.asarray(s)))
        grad = np.asarray(jax.grad(lambda x: jnp.sum(loss(x)))(jnp.asarray(s)))
    ref_f = lambda x: ref_hybrid_full(np.exp(np_log_softmax(x / TEMP)), p, t2s, shared, 0.5, wm, wu)  # noqa: E731
    np.testing.assert_allclose(got, ref_f(s), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(grad, fd_grad(lambda x: ref_f(x).sum(), s), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_same_tokenizer_hybrid_is_plain_jsd(toks, beta):
    """One tokenizer on both sides: adaptive weights are (1, 0) and the hybrid is the JSD (float32, 1e-6)."""
    vm = shared_vocab(toks["bl300"], toks["bl300"])
    v = vm.student_vocab_size
    wm, wu = vm.adaptive_weights()
    rng = np.random.default_rng(7)
    s = rng.normal(size=(2, 5, v)).astype(np.float32) * 3
    t = rng.normal(size=(2, 5, v)).astype(np.float32) * 3
    mask = np.ones((2, 5), np.float32)
    logq = jax.nn.log_softmax(jnp.asarray(s) / TEMP, axis=-1)
    logp = jax.nn.log_softmax(jnp.asarray(t) / TEMP, axis=-1)
    full = hybrid_full_terms(logq, logp, jnp.asarray(vm.teacher_to_student), jnp.asarray(vm.student_shared),
                             beta=beta, matched_weight=wm, unmatched_weight=wu)[0]
    ref = generalized_jsd(s, t, mask, beta=beta, temperature=TEMP, reduction="none")
    np.testing.assert_allclose(np.asarray(full), np.asarray(ref), atol=1e-6)
    lt, tid = jax.lax.top_k(logp, 16)
    lm = jax.nn.logsumexp(lt, axis=-1)
    top = hybrid_topk_terms(logq, lt, jnp.asarray(vm.map_ids(np.asarray(tid))), jnp.asarray(vm.student_shared),
                            lm, beta=beta, matched_weight=wm, unmatched_weight=wu)[0]
    ref_k = topk_jsd(s, lt, tid, mask, beta=beta, temperature=TEMP, reduction="none", teacher_logmass=lm)
    np.testing.assert_allclose(np.asarray(top), np.asarray(ref_k), atol=1e-6)


def test_span_logscale_matches_loop():
    rng = np.random.default_rng(3)
    lq = np.log(rng.uniform(1e-10, 1.0, size=(2, 7)))
    span_id = np.array([[0, 0, 0, 1, 2, 2, -1], [0, 1, 1, 2, 2, 2, 2]])
    base = np.array([[1, 0, 0, 1, 1, 0, 0], [1, 0, 1, 0, 0, 0, 1]], bool)  # observed row 0, bayesian row 1
    ref = np.zeros_like(lq)
    for b in range(2):
        for r in np.nonzero(base[b])[0]:
            others = (span_id[b] == span_id[b, r]) & ~base[b]
            ref[b, r] = np.maximum(lq[b][others], np.log(1e-8)).sum()
    with jax.enable_x64(True):
        got = span_logscale(jnp.asarray(lq), jnp.asarray(span_id), jnp.asarray(base))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-12)


# ---------------------------------------------------------------- start-up check
def test_cross_tokenizer_key_and_refusal_message():
    from gold_jax import config as config_lib
    from gold_jax.teacher.client import TeacherClient
    cfg = config_lib.base_config()
    assert cfg.gold.cross_tokenizer is False
    cfg.gold.cross_tokenizer = True
    config_lib.validate(cfg)   # wired through the teacher server (tests/test_crosstok_wire.py)
    cfg.gold.top_k = 0
    with pytest.raises(ValueError, match="gold.cross_tokenizer.*gold.top_k"):
        config_lib.validate(cfg)

    class Stub:  # check_student only reads info() and address
        address = "tcp://127.0.0.1:1"

        def info(self):
            return {"tokenizer_fingerprint": "teacher-fp", "model_name": "t", "vocab_size": 50}
    with pytest.raises(ValueError, match="different tokenizer.*gold.cross_tokenizer"):
        TeacherClient.check_student(Stub(), 50, "student-fp")


# ---------------------------------------------------------------- teacher fields + loss, end to end on real tokenizers
@pytest.mark.parametrize("strategy", ["observed", "bayesian"])
@pytest.mark.parametrize("hybrid", [True, False])
def test_cross_loss_end_to_end_matches_span_merge_reference(toks, strategy, hybrid):
    """Student bl300 vs teacher bf: spans merged by TRL's rule, written here straight from the spans."""
    from gold_jax.crosstok.fields import pad_rows, student_fields
    from gold_jax.losses.uld import cross_per_token
    s_tok, t_tok = toks["bl300"], toks["bf"]
    text = "数学 🙂 naïve café, hello   world<|im_end|>"
    sid = s_tok.encode(text, add_special_tokens=False).ids
    tid = teacher_ids_for(t_tok, s_tok, sid)
    al = align(s_tok, sid, t_tok, tid)
    assert al.unaligned_frac == 0
    assert any(s1 - s0 > 1 for s0, s1, *_ in al.spans) and any(t1 - t0 > 1 for _, _, t0, t1, _, _ in al.spans)
    vm = shared_vocab(s_tok, t_tok)
    wm, wu = vm.adaptive_weights()
    ns, nt, vs, vt, k, beta = len(sid), len(tid), vm.student_vocab_size, vm.teacher_vocab_size, 12, 0.5
    rng = np.random.default_rng(11)
    lp = np_log_softmax(rng.normal(size=(nt, vt)) * 3)
    top = np.argsort(-lp, axis=-1)[:, :k]
    lp_k = np.take_along_axis(lp, top, -1)
    lm = np.log(np.exp(lp_k).sum(-1))
    tok_lp = lp[np.arange(nt), tid]
    f = student_fields(al, vm, lp_k, top, lm, tok_lp, strategy)
    batch = pad_rows([f], ns + 3)
    logits = rng.normal(size=(1, ns + 3, vs)) * 3
    cids = np.pad(np.asarray(sid), (0, 3))[None]
    with jax.enable_x64(True):
        def loss(x):
            fj = {name: jnp.asarray(v) for name, v in batch.items()}
            return cross_per_token(x, jnp.asarray(cids), fj, jnp.asarray(vm.student_shared), temperature=1.0,
                                   beta=beta, matched_weight=wm, unmatched_weight=wu, hybrid=hybrid)
        got = np.asarray(loss(jnp.asarray(logits)))
        d = rng.normal(size=logits.shape)
        g = np.asarray(jax.grad(lambda x: jnp.sum(loss(x)))(jnp.asarray(logits)))

    def ref(x):
        q = np.exp(np_log_softmax(x[0]))
        out = np.zeros(ns + 3)
        for s0, s1, t0, t1, _, _ in al.spans:
            sb, tb = (s0, t0) if strategy == "observed" else (s1 - 1, t1 - 1)
            ss = np.prod([max(q[r, sid[r]], 1e-8) for r in range(s0, s1) if r != sb])
            ts = np.prod([max(np.exp(lp[j, tid[j]]), 1e-8) for j in range(t0, t1) if j != tb])
            tk = np.exp(lp_k[tb])
            if hybrid:
                out[sb] = ref_hybrid_topk(q[sb][None], tk[None], np.array([1 - tk.sum()]),
                                          vm.map_ids(top[tb])[None], vm.student_shared, beta, wm, wu,
                                          np.array([ss]), np.array([ts]))[0]
            else:
                out[sb] = ref_uld_topk(q[sb][None], tk[None], np.array([1 - tk.sum()]), np.array([ss]),
                                       np.array([ts]))[0]
        return out
    np.testing.assert_allclose(got[0], ref(logits), rtol=1e-6, atol=1e-9)
    eps = 1e-6
    fd = (ref(logits + eps * d).sum() - ref(logits - eps * d).sum()) / (2 * eps)
    np.testing.assert_allclose(np.sum(g * d), fd, rtol=1e-5)
    assert np.all(got[0, ns:] == 0) and batch["loss_mask"].sum() == len(al.spans)

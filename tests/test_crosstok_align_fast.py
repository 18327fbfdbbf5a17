"""The windowed `token_bytes` and the vectorised `align_offsets` against the quadratic definitions (issue 15).

`_token_bytes_prefix` decodes every prefix (the definition of a token's end
offset); `_align_offsets_walk` is the boundary-by-boundary walk. The fast paths
must give identical texts, offsets and spans on every text of test_crosstok
(ASCII, CJK, emoji, whitespace runs, chat special tokens, characters split into
byte tokens), on random id sequences (invalid UTF-8 runs included), and for
decoders with start-of-sequence rules; a decoder that is not local must fall
back to the definition.
"""
import numpy as np
import pytest
from test_crosstok import CORPUS, PAIRS, TEXTS, byte_fallback, byte_level
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gold_jax.crosstok import align as align_mod
from gold_jax.crosstok.align import (_align_offsets_walk, _token_bytes_prefix, align, align_offsets, teacher_ids_for,
                                     token_bytes)

MORE = {
    "mixed": " ".join(TEXTS.values()),
    "emoji_run": "🙂🚀🎉🙂 x🚀",
    "leading_space": "  hello\tworld ",
    "fffd": "a\ufffdb \ufffd",        # a literal U+FFFD is text, not a partial character
}


def metaspace_first(vocab: int) -> Tokenizer:
    """Llama-style: Metaspace prepending a space to the first word, decoder strips it at the start only."""
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|im_start|>", "<|im_end|>"] + [f"<0x{i:02X}>" for i in range(256)],
        limit_alphabet=60, show_progress=False))
    return tok


@pytest.fixture(scope="module")
def toks():
    return {"bl300": byte_level(300), "bl420": byte_level(420), "bf": byte_fallback(420),
            "bl_nospecial": byte_level(380, special=()), "ms_first": metaspace_first(400)}


def _same(tok, ids, *, local: bool | None = True):
    """The windowed path (forced, whatever the length) and token_bytes both equal the prefix rule.

    local: whether the windowed path must answer (True) or must give up (False); None: either, as on
    random byte soup, where a byte-fallback group that turns invalid later rewrites an earlier character.
    """
    ids = [int(i) for i in ids]
    ref = _token_bytes_prefix(tok, ids)
    windowed = align_mod._token_bytes_windowed(tok, ids) if ids else None
    if local is not None:
        assert (windowed is not None) == (local and bool(ids)), "the windowed path gave up on a local decoder"
    for got in ([windowed] if windowed is not None else []) + [token_bytes(tok, ids)]:
        assert got.text == ref.text
        np.testing.assert_array_equal(got.ends, ref.ends)
    return ref


@pytest.mark.parametrize("tname", ["bl300", "bl420", "bf", "bl_nospecial", "ms_first"])
def test_token_bytes_matches_prefix_rule_on_texts(toks, tname):
    tok = toks[tname]
    split_seen = False
    for text in list(TEXTS.values()) + list(MORE.values()):
        ids = tok.encode(text, add_special_tokens=False).ids
        tb = _same(tok, ids)
        split_seen |= bool(np.any(tb.ends[:-1] < 0))
    if tname in ("bl300", "bf"):
        assert split_seen, "the texts must exercise partial-UTF-8 runs"


@pytest.mark.parametrize("tname", ["bl300", "bf", "ms_first"])
def test_token_bytes_matches_prefix_rule_on_random_ids(toks, tname):
    """Random ids: byte tokens in any order (invalid UTF-8), specials, zero-width pieces."""
    tok = toks[tname]
    rng = np.random.default_rng(0)
    v = tok.get_vocab_size()
    byte_ids = [i for i in range(v) if tok.id_to_token(i).startswith("<0x") or len(tok.id_to_token(i)) == 1]
    for _ in range(150):
        n = int(rng.integers(1, 25))
        pool = byte_ids if rng.random() < 0.5 else range(v)
        _same(tok, rng.choice(pool, size=n).tolist(), local=None)


def test_token_bytes_empty_and_single(toks):
    tb = token_bytes(toks["bl300"], [])
    assert tb.text == "" and tb.ends.shape == (0,)
    _same(toks["bf"], toks["bf"].encode("€").ids[:1])


class CleanupDecoder:
    """A non-local decoder: " ." becomes "." (transformers' clean_up_tokenization_spaces), so a prefix's last
    character changes when the next token arrives."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def decode_batch(self, sequences, skip_special_tokens=False):
        self.calls += 1
        return [s.replace(" .", ".").replace(" ,", ",")
                for s in self.tok.decode_batch(sequences, skip_special_tokens=skip_special_tokens)]


def test_non_local_decoder_falls_back_to_prefix_rule(toks, monkeypatch):
    tok = toks["bl300"]
    dec = CleanupDecoder(tok)
    # "a", " ", ".", " b": the prefix "a " is not a prefix of the full text "a. b" (a decoder that looks ahead).
    ids = [tok.token_to_id(t) for t in ("a", "Ġ", ".", "Ġb")]
    assert None not in ids
    _same(dec, ids, local=False)   # the windowed path notices and token_bytes decodes every prefix
    monkeypatch.setattr(align_mod, "_SHORT", 0)
    fallbacks = []
    orig = align_mod._token_bytes_prefix
    monkeypatch.setattr(align_mod, "_token_bytes_prefix", lambda t, i: fallbacks.append(1) or orig(t, i))
    got, ref = token_bytes(dec, ids), orig(dec, ids)
    assert got.text == ref.text and np.array_equal(got.ends, ref.ends) and fallbacks == [1]


def test_long_sequences_take_the_windowed_path(toks, monkeypatch):
    tok = toks["bf"]
    ids = tok.encode(MORE["mixed"] * 3, add_special_tokens=False).ids
    assert len(ids) > align_mod._SHORT
    monkeypatch.setattr(align_mod, "_token_bytes_prefix", lambda t, i: pytest.fail("decoded every prefix"))
    assert token_bytes(tok, ids).text == MORE["mixed"] * 3


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_align_matches_reference(toks, pair):
    """Whole alignment: fast path vs the prefix rule + boundary walk, same spans and unaligned counts."""
    s_tok, t_tok = toks[pair[0]], toks[pair[1]]
    texts = list(TEXTS.values()) + list(MORE.values())
    cases = [(s_tok.encode(t, add_special_tokens=False).ids, None) for t in texts]
    cases.append((s_tok.encode("the quick brown fox", add_special_tokens=False).ids,
                  t_tok.encode("the quick red dog", add_special_tokens=False).ids))   # texts that differ
    for sid, tid in cases:
        tid = tid if tid is not None else teacher_ids_for(t_tok, s_tok, sid)
        got = align(s_tok, sid, t_tok, tid)
        sb, tb = _token_bytes_prefix(s_tok, list(sid)), _token_bytes_prefix(t_tok, list(tid))
        s_raw, t_raw = sb.text.encode(), tb.text.encode()
        n = min(len(s_raw), len(t_raw))
        diff = next((i for i in range(n) if s_raw[i] != t_raw[i]), n)
        ref = _align_offsets_walk(sb.ends, tb.ends, _common(sb.ends, tb.ends, diff))
        assert got == ref


def _common(a, b, n_bytes):
    c = np.intersect1d(a[a >= 0], b[b >= 0])
    return c[(c > 0) & (c <= n_bytes)]


def test_align_offsets_matches_walk_on_random_offsets():
    rng = np.random.default_rng(1)
    for _ in range(300):
        ends = []
        for _side in range(2):
            e = np.cumsum(rng.integers(0, 4, size=int(rng.integers(1, 20))))
            e[rng.random(len(e)) < 0.25] = -1
            if rng.random() < 0.2 and len(e) > 2:   # out of order: must take the walk
                e[:2] = e[:2][::-1] + 5
            ends.append(e)
        n_bytes = int(rng.integers(0, 40))
        assert align_offsets(ends[0], ends[1], n_bytes) == _align_offsets_walk(
            ends[0], ends[1], _common(ends[0], ends[1], n_bytes))

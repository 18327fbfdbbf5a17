"""Align a student and a teacher tokenization of the same text by UTF-8 byte offsets.

Why bytes and prefix decoding: on-policy completions exist only as student ids,
so offsets cannot come from encoding a string. Each token's end offset is the
UTF-8 length of the decoded prefix ending at it. A byte-level or byte-fallback
token that ends inside a multi-byte character decodes to U+FFFD there, so its
prefix is not a prefix of the full text: that token gets *no* boundary and is
merged with its neighbours until the character is complete. Two tokens end at a
common boundary exactly when both tokenizers split the text there; the spans
between consecutive common boundaries cover identical bytes on both sides (as
TRL GOLD's `_align_by_byte_offsets` walk, plus the partial-character rule).

Tokens that cannot be aligned (the two texts differ after some point, or a
token past the last common boundary) belong to no span: they are masked and
counted (`gold/unaligned_frac`), never paired with the wrong text.

Speed: decoding every prefix is quadratic (2.4 s for 2.2k tokens). The decoders
in use (byte-level, byte-fallback, Metaspace/Replace/Strip/Fuse) are local:
once a prefix ends on a complete character, the text of what follows does not
depend on it, except for start-of-sequence rules (a stripped leading space).
So `token_bytes` decodes each token with a few tokens of left context that
start on a complete-character boundary and subtracts the context's text (two
batched calls for the whole sequence); only inside a partial-UTF-8 run does it
widen the window back to the last complete character, which is the prefix rule
relative to that boundary. Whatever breaks the locality assumption (a window
whose text does not extend its context's, a complete piece that is not the
full text's next bytes, pieces that do not add up to the full decode; e.g. a
byte-fallback run that turns invalid later and so rewrites characters before it)
sends the sequence to the exact prefix rule (`_token_bytes_prefix`), so the
result is always the prefix rule's. Sequences of at most 32 tokens take the
prefix rule directly: it is faster there.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

MERGE_STRATEGIES = ("observed", "bayesian")  # TRL GOLD's uld_token_merge_strategy values


class Decoder(Protocol):
    def decode_batch(self, sequences: list[list[int]], skip_special_tokens: bool = ...) -> list[str]: ...


@dataclasses.dataclass(frozen=True)
class TokenBytes:
    """One tokenization's text and, per token, the byte offset where it ends (-1: ends mid-character)."""
    text: str
    ends: np.ndarray  # int64 [n]


@dataclasses.dataclass(frozen=True)
class Alignment:
    """Spans covering the same bytes on both sides, as half-open token ranges.

    spans[i] = (s_start, s_stop, t_start, t_stop, b_start, b_stop): student
    tokens [s_start, s_stop) and teacher tokens [t_start, t_stop) both decode to
    bytes [b_start, b_stop) of the common text.
    """
    spans: tuple[tuple[int, int, int, int, int, int], ...]
    n_student: int
    n_teacher: int

    @property
    def student_aligned(self) -> np.ndarray:
        """Boolean [n_student]: the token lies in some span."""
        out = np.zeros(self.n_student, bool)
        for s0, s1, *_ in self.spans:
            out[s0:s1] = True
        return out

    @property
    def n_unaligned_student(self) -> int:
        return int(self.n_student - self.student_aligned.sum())

    @property
    def unaligned_frac(self) -> float:
        """Fraction of student tokens that belong to no span (the gold/unaligned_frac metric)."""
        return self.n_unaligned_student / max(self.n_student, 1)


def token_bytes(tokenizer: Decoder, ids: Sequence[int]) -> TokenBytes:
    """Decoded text and each token's end byte offset: the UTF-8 length of the decoded prefix ending at it.

    Special tokens are kept (skip_special_tokens=False) so chat-template
    markers are text on both sides and align like any other bytes. Same result
    as `_token_bytes_prefix` (decode every prefix) in linear time; see the module doc.
    """
    ids = [int(i) for i in ids]
    if not ids:
        return TokenBytes("", np.zeros(0, np.int64))
    if len(ids) <= _SHORT:   # a few prefixes cost less than the windows' bookkeeping
        return _token_bytes_prefix(tokenizer, ids)
    fast = _token_bytes_windowed(tokenizer, ids)
    return fast if fast is not None else _token_bytes_prefix(tokenizer, ids)


_CONTEXT = 2          # tokens of left context per window (absorbs start-of-sequence decoder rules)
_SHORT = 32           # up to this many tokens, decoding every prefix is faster (measured: crosstok_bench)
_PARTIAL = "\ufffd"   # what a decoder makes of a character cut in the middle


def _token_bytes_windowed(tokenizer: Decoder, ids: list[int]) -> TokenBytes | None:
    """The prefix rule from short windows; None where the decoder is not local (then the caller decodes prefixes).

    Invariant: `done` tokens decode to the first `done_chars` characters
    (`done_bytes` bytes) of the full text and end on a complete character; a
    window starting at such a boundary (`commits`) gives the exact text of the
    tokens after its context. A speculative window [i - _CONTEXT, i] per token
    is decoded in one batch and used where both its start and token i's start
    are such boundaries; elsewhere (a partial-character run) the window starts
    one committed piece before `done` and grows until the character completes.
    """
    n = len(ids)
    starts = [max(0, i - _CONTEXT) for i in range(n)]
    decoded = tokenizer.decode_batch([ids] + [ids[s:i + 1] for i, s in enumerate(starts)]
                                     + [ids[s:i] for i, s in enumerate(starts)], skip_special_tokens=False)
    text, wins, bases = decoded[0], decoded[1:n + 1], decoded[n + 1:]
    # The common case, no partial character anywhere: every token start is a boundary, every window
    # valid, and the pieces must add up to the text (what the walk below would check piece by piece).
    pieces = [w[len(b):] if w.startswith(b) else None for w, b in zip(wins, bases)]
    if None not in pieces and not any(p.endswith(_PARTIAL) for p in pieces) and "".join(pieces) == text:
        return TokenBytes(text, np.cumsum([len(p.encode("utf-8")) for p in pieces], dtype=np.int64))
    ends = np.full(n, -1, np.int64)
    commits = {0}
    prev_commit, done, done_chars, done_bytes = 0, 0, 0, 0
    slow_base: tuple[int, int, str] | None = None   # (context start, done, its text) of the slow window
    for i in range(n):
        if done == i and starts[i] in commits:
            win, base = wins[i], bases[i]
        else:
            ctx = prev_commit if done > 0 else 0
            if slow_base is None or slow_base[:2] != (ctx, done):
                slow_base = (ctx, done, tokenizer.decode_batch([ids[ctx:done]], skip_special_tokens=False)[0])
            base = slow_base[2]
            win = tokenizer.decode_batch([ids[ctx:i + 1]], skip_special_tokens=False)[0]
        if not win.startswith(base):
            return None
        piece = win[len(base):]                      # the text of tokens done..i
        if text.startswith(piece, done_chars):
            ends[i] = done_bytes + len(piece.encode("utf-8"))
        if not piece.endswith(_PARTIAL):             # a complete character: a new boundary
            if ends[i] < 0:
                return None
            prev_commit, done = done, i + 1
            done_chars, done_bytes = done_chars + len(piece), int(ends[i])
            commits.add(done)
    if done_chars != len(text) and done == n:
        return None
    ends[-1] = len(text.encode("utf-8"))
    return TokenBytes(text, ends)


def _token_bytes_prefix(tokenizer: Decoder, ids: list[int]) -> TokenBytes:
    """The definition: decode every prefix (one batched call, quadratic); the reference for the fast path."""
    prefixes = tokenizer.decode_batch([ids[:i + 1] for i in range(len(ids))], skip_special_tokens=False)
    text = prefixes[-1]
    ends = np.full(len(ids), -1, np.int64)
    for i, p in enumerate(prefixes):
        # A prefix ending in a partial character decodes to U+FFFD, which the full text lacks there.
        if text.startswith(p):
            ends[i] = len(p.encode("utf-8"))
    ends[-1] = len(text.encode("utf-8"))
    return TokenBytes(text, ends)


def align_offsets(s_ends: np.ndarray, t_ends: np.ndarray, n_bytes: int) -> Alignment:
    """Spans between consecutive byte boundaries that both sides share, up to `n_bytes`.

    s_ends / t_ends: per-token end offsets (-1 = no boundary after this token),
    non-decreasing where set. Tokens after the last common boundary (<= n_bytes)
    stay unaligned.
    """
    s_ends, t_ends = np.asarray(s_ends, np.int64), np.asarray(t_ends, np.int64)
    common = np.intersect1d(s_ends[s_ends >= 0], t_ends[t_ends >= 0])
    common = common[(common > 0) & (common <= n_bytes)]
    s_stops, t_stops = _last_stops(s_ends, common), _last_stops(t_ends, common)
    if s_stops is None or t_stops is None:   # offsets out of order: the general walk
        return _align_offsets_walk(s_ends, t_ends, common)
    s_starts = np.concatenate([[0], s_stops[:-1]]).tolist()
    t_starts = np.concatenate([[0], t_stops[:-1]]).tolist()
    b_starts = np.concatenate([[0], common[:-1]]).tolist()
    spans = tuple(zip(s_starts, s_stops.tolist(), t_starts, t_stops.tolist(), b_starts, common.tolist()))
    return Alignment(spans, len(s_ends), len(t_ends))


def _last_stops(ends: np.ndarray, common: np.ndarray) -> np.ndarray | None:
    """Per common boundary c, one past the last token ending at c; None unless the set ends are non-decreasing.

    With non-decreasing ends this is exactly `_stop_at` from the previous
    stop: every token before the stop ends at or below c, none after it at c.
    """
    idx = np.flatnonzero(ends >= 0)
    vals = ends[idx]
    if np.any(np.diff(vals) < 0):
        return None
    return idx[np.searchsorted(vals, common, side="right") - 1] + 1


def _align_offsets_walk(s_ends: np.ndarray, t_ends: np.ndarray, common: np.ndarray) -> Alignment:
    """align_offsets for any order of offsets: walk the common boundaries, stop at the first that fails."""
    spans = []
    s = t = 0
    b_prev = 0
    for c in common:
        # Advance each side to (and including) the last token whose boundary is c; tokens without a
        # boundary (mid-character, or zero-width ones that repeat c) are swallowed into the span.
        s_stop = _stop_at(s_ends, s, c)
        t_stop = _stop_at(t_ends, t, c)
        if s_stop is None or t_stop is None:
            break
        spans.append((s, s_stop, t, t_stop, int(b_prev), int(c)))
        s, t, b_prev = s_stop, t_stop, c
    return Alignment(tuple(spans), len(s_ends), len(t_ends))


def _stop_at(ends: np.ndarray, start: int, c: int) -> int | None:
    """One past the last token index >= start whose end is c, if all tokens before it end at or below c."""
    hits = np.nonzero(ends[start:] == c)[0]
    if len(hits) == 0:
        return None
    stop = start + int(hits[-1]) + 1
    before = ends[start:stop]
    if np.any(before[before >= 0] > c):
        return None
    return stop


def align(student_tok: Decoder, student_ids: Sequence[int], teacher_tok: Decoder,
          teacher_ids: Sequence[int]) -> Alignment:
    """Align two tokenizations; bytes after the texts' first difference stay unaligned."""
    sb, tb = token_bytes(student_tok, student_ids), token_bytes(teacher_tok, teacher_ids)
    s_raw, t_raw = sb.text.encode("utf-8"), tb.text.encode("utf-8")
    n = min(len(s_raw), len(t_raw))
    neq = np.flatnonzero(np.frombuffer(s_raw, np.uint8, n) != np.frombuffer(t_raw, np.uint8, n))
    diff = int(neq[0]) if len(neq) else n
    # Only boundaries inside the common prefix of the two texts can be trusted.
    return align_offsets(sb.ends, tb.ends, diff)


def teacher_ids_for(teacher_tok, student_tok: Decoder, student_ids: Sequence[int]) -> list[int]:
    """The teacher's tokenization of the text the student ids decode to (specials kept as text)."""
    text = student_tok.decode(list(map(int, student_ids)), skip_special_tokens=False)
    return list(teacher_tok.encode(text, add_special_tokens=False).ids)


@dataclasses.dataclass(frozen=True)
class SpanArrays:
    """Per-student-position arrays the loss reads (numpy, [n_student]).

    base: this position carries its span's loss (the first position for
    "observed", the last for "bayesian"); in_span: the position belongs to a
    span; span_id: index of its span (-1 if none); teacher_base: the teacher
    position whose distribution is the span's base (-1 if none);
    teacher_scalar_pos: per span, the teacher positions whose actual-token
    probabilities multiply the base (TRL's merge rule).
    """
    base: np.ndarray
    in_span: np.ndarray
    span_id: np.ndarray
    teacher_base: np.ndarray
    teacher_scalar_pos: tuple[tuple[int, ...], ...]


def span_arrays(al: Alignment, strategy: str = "observed") -> SpanArrays:
    """Where each span's merged distribution sits, under TRL's "observed" or "bayesian" merge.

    Position r's distribution here predicts token r (our completion rows are
    already shifted), so "observed" = the first token's distribution times the
    conditionals of the actual later tokens, "bayesian" = the last token's
    distribution (given the actual prefix) times the probabilities of the actual
    earlier tokens. Both give the joint probability of the observed span.
    """
    if strategy not in MERGE_STRATEGIES:
        raise ValueError(f"gold.uld_token_merge_strategy={strategy!r}; known: {MERGE_STRATEGIES}")
    n = al.n_student
    base = np.zeros(n, bool)
    in_span = np.zeros(n, bool)
    span_id = np.full(n, -1, np.int32)
    teacher_base = np.full(n, -1, np.int32)
    scalars = []
    for i, (s0, s1, t0, t1, _, _) in enumerate(al.spans):
        b = s0 if strategy == "observed" else s1 - 1
        tb = t0 if strategy == "observed" else t1 - 1
        base[b] = True
        in_span[s0:s1] = True
        span_id[s0:s1] = i
        teacher_base[b] = tb
        scalars.append(tuple(j for j in range(t0, t1) if j != tb))
    return SpanArrays(base, in_span, span_id, teacher_base, tuple(scalars))

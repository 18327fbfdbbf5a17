"""Teacher wire format: every message kind, its checks, the batching key and the error codes.

A message is a list of ZeroMQ frames: frame 0 is a msgpack map, frames 1..n
are the raw little-endian bytes of the arrays it names (``[name, dtype,
shape]``), so arrays travel without a copy into msgpack and never through
pickle. Every field of every message kind is type-checked here before anyone
uses it: a hostile or broken peer gets an error reply (or its message is
dropped and logged), never a crash or an allocation it chose.

    client -> server  request: {"v", "id": str, "op": str, "args": {...}, "arrays": [[name, dtype, shape]]}
    server -> client  reply:   {"v", "id": str, "ok": bool, "code": str, "error": str, "meta": {...}, "arrays"}
    worker -> server  {"type": "ready", "v", "info": {...}} | {"type": "hb"} | {"type": "reply"} + reply frames
    server -> worker  {"type": "task", "n_frames": [int]} + request frames | {"type": "who"}
                      | {"type": "reject", "error": str}

`info` replies carry ``protocol_version``: the handshake in which a client
finds out that it speaks another version than the server.

Version 2 (issue 15, cross-tokenizer distillation) adds the ``uint8`` dtype,
the ``vocab`` op (the teacher's token strings, fetched once per run) and the
``cross`` score: the client sends, per sequence, the prompt and completion
*text* (UTF-8, decoded with the student tokenizer) and the byte offset where
each student completion token ends; the teacher tokenizes the text with its
own tokenizer, scores, aligns and answers per *student* position
(gold_jax.crosstok.request). A version-1 peer gets VERSION_MISMATCH naming
both versions.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import msgpack
import numpy as np

from gold_jax.types import RolloutResult, SequenceBatch, TeacherScores

PROTOCOL_VERSION = 2   # 2: uint8 arrays, the "vocab" op and cross-tokenizer scores (issue 15)
OPS = ("info", "score", "generate", "ping", "head", "vocab")
# bfloat16 travels as its raw 16 bits (little-endian), like the others.
DTYPES = {"int32": np.dtype("<i4"), "float32": np.dtype("<f4"), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "uint8": np.dtype("u1")}   # uint8: UTF-8 text (cross-tokenizer requests, the vocab reply)
SIGNALS = ("logprobs", "hidden", "cross")   # a score reply: top-k / full rows, final hidden states, or
#                                            top-k aligned to the student's tokens (issue 15)
MERGE_STRATEGIES = ("observed", "bayesian")   # TRL GOLD's uld_token_merge_strategy (gold_jax.crosstok.align)
MAX_VOCAB_BYTES = 64 << 20   # one `vocab` reply: the teacher's token strings

MAX_MESSAGE_BYTES = 256 << 20   # whole request, header plus arrays
MAX_HEADER_BYTES = 64 << 10
MAX_TOKENS = 1 << 22            # B * L of one request
MAX_TOP_K = 1024
MAX_ARRAYS = 16
MAX_NEW_TOKENS = 1 << 16
MAX_ID_CHARS = 128
MAX_ERROR_CHARS = 4096
MAX_TASK_REQUESTS = 4096        # requests in one server -> worker task


class ErrorCode(str, enum.Enum):
    """Why a request failed; travels as the reply's "code" so nobody parses message text."""
    BAD_REQUEST = "bad_request"            # malformed or invalid: retrying cannot help
    VERSION_MISMATCH = "version_mismatch"  # the peers speak different protocol versions
    BUSY = "busy"                          # queue full: retry later
    BACKEND_FAILED = "backend_failed"      # the worker's model raised
    INTERNAL = "internal"                  # a bug in the server


CLIENT_FAULTS = (ErrorCode.BAD_REQUEST, ErrorCode.VERSION_MISMATCH)


class ProtocolError(ValueError):
    """A message that does not follow the protocol (reported back to the sender)."""

    def __init__(self, msg: str, code: ErrorCode = ErrorCode.BAD_REQUEST):
        super().__init__(msg)
        self.code = code


@dataclasses.dataclass
class Message:
    id: str
    op: str                 # request op, or "reply"
    args: dict[str, Any]    # request args / reply meta
    arrays: dict[str, np.ndarray]
    ok: bool = True
    error: str = ""
    code: ErrorCode | None = None


def _array_specs(arrays: Mapping[str, np.ndarray]) -> tuple[list, list]:
    specs, frames = [], []
    for name, a in arrays.items():
        if a is None:
            continue
        a = np.asarray(a)
        dt = {np.dtype(np.int32): "int32", np.dtype(np.float32): "float32",
              np.dtype(ml_dtypes.bfloat16): "bfloat16", np.dtype(np.uint8): "uint8"}.get(a.dtype.newbyteorder("="))
        if dt is None:
            raise TypeError(f"array {name!r}: dtype {a.dtype} is not sendable (int32, float32, bfloat16 or uint8)")
        a = np.ascontiguousarray(a, dtype=DTYPES[dt])
        specs.append([name, dt, list(a.shape)])
        raw = a.view(np.uint16) if dt == "bfloat16" else a   # Python buffers know no bfloat16
        frames.append(memoryview(raw).cast("B") if a.size else b"")
    return specs, frames


def encode_request(req_id: str, op: str, args: Mapping[str, Any] | None = None,
                   arrays: Mapping[str, np.ndarray] | None = None) -> list:
    specs, frames = _array_specs(arrays or {})
    header = {"v": PROTOCOL_VERSION, "id": req_id, "op": op, "args": dict(args or {}), "arrays": specs}
    return [msgpack.packb(header, use_bin_type=True), *frames]


def encode_reply(req_id: str, *, meta: Mapping[str, Any] | None = None,
                 arrays: Mapping[str, np.ndarray] | None = None, error: str = "",
                 code: ErrorCode | None = None) -> list:
    """A reply; with `error`, a failure whose `code` (default BACKEND_FAILED) says whose fault it is."""
    specs, frames = _array_specs(arrays or {}) if not error else ([], [])
    header = {"v": PROTOCOL_VERSION, "id": req_id, "ok": not error, "error": error[:MAX_ERROR_CHARS],
              "code": (code or ErrorCode.BACKEND_FAILED).value if error else "",
              "meta": dict(meta or {}), "arrays": specs}
    return [msgpack.packb(header, use_bin_type=True), *frames]


def error_reply(req_id: str, err: ProtocolError | str, code: ErrorCode | None = None) -> list:
    """Error reply to `req_id` ("?" when the request had no readable id)."""
    if isinstance(err, ProtocolError):
        code = code or err.code
    return encode_reply(req_id or "?", error=str(err), code=code or ErrorCode.BAD_REQUEST)


def _check(cond: bool, msg: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
    if not cond:
        raise ProtocolError(msg, code)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _valid_id(rid: Any) -> bool:
    return isinstance(rid, str) and 0 < len(rid) <= MAX_ID_CHARS


def _unpack_map(frame: Any, what: str) -> dict:
    _check(len(frame) <= MAX_HEADER_BYTES, f"{what} of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        h = msgpack.unpackb(bytes(frame), raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 - msgpack raises several types
        raise ProtocolError(f"{what} is not valid msgpack: {type(e).__name__}") from None
    _check(isinstance(h, dict), f"{what} must be a msgpack map, got {type(h).__name__}")
    return h


def peek_id(frame: Any) -> str:
    """Best-effort request id of a header frame (for error replies to bad messages)."""
    try:
        h = msgpack.unpackb(bytes(frame[:MAX_HEADER_BYTES]), raw=False)
        rid = h.get("id", "") if isinstance(h, dict) else ""
        return rid if _valid_id(rid) else ""
    except Exception:  # noqa: BLE001 - any garbage means "no id"
        return ""


def _decode_arrays(specs: Any, bufs: Sequence[Any]) -> dict[str, np.ndarray]:
    _check(isinstance(specs, list) and len(specs) <= MAX_ARRAYS, f"'arrays' must be a list of <= {MAX_ARRAYS} specs")
    _check(len(specs) == len(bufs), f"header names {len(specs)} arrays but {len(bufs)} frames follow")
    arrays: dict[str, np.ndarray] = {}
    for spec, buf in zip(specs, bufs):
        _check(isinstance(spec, list) and len(spec) == 3, "array spec must be [name, dtype, shape]")
        name, dt, shape = spec
        _check(isinstance(name, str) and len(name) <= 64 and name not in arrays,
               f"bad or duplicate array name {str(name)[:64]!r}")
        _check(isinstance(dt, str) and dt in DTYPES, f"array {name!r}: dtype {str(dt)[:32]!r} not allowed "
               f"({', '.join(DTYPES)})")
        _check(isinstance(shape, list) and len(shape) <= 4 and all(_is_int(d) and 0 <= d < 1 << 31 for d in shape),
               f"array {name!r}: bad shape {str(shape)[:64]}")
        nbytes = math.prod(shape) * DTYPES[dt].itemsize
        _check(nbytes == len(buf), f"array {name!r}: shape {shape} {dt} needs {nbytes} bytes, got {len(buf)}")
        arrays[name] = np.frombuffer(buf, dtype=DTYPES[dt]).reshape(shape)
    return arrays


def decode(frames: Sequence[Any], *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate the framing of a request or reply (not the op's arguments).

    Raises only ProtocolError, whatever the bytes.
    """
    try:
        return _decode(frames, max_bytes)
    except ProtocolError:
        raise
    except Exception as e:  # noqa: BLE001 - a check above missed a case: still the sender's fault
        raise ProtocolError(f"malformed message ({type(e).__name__}: {str(e)[:200]})") from None


def _decode(frames: Sequence[Any], max_bytes: int) -> Message:
    _check(len(frames) >= 1, "empty message")
    total = sum(len(f) for f in frames)
    _check(total <= max_bytes, f"message of {total} bytes exceeds the limit of {max_bytes} bytes")
    h = _unpack_map(frames[0], "header")
    v = h.get("v")
    _check(_is_int(v) and v == PROTOCOL_VERSION,
           f"protocol version {str(v)[:32]} from the peer, this side speaks {PROTOCOL_VERSION}: "
           "run the same gold_jax version on client, server and workers", ErrorCode.VERSION_MISMATCH)
    rid = h.get("id")
    _check(_valid_id(rid), f"'id' must be a non-empty string of <= {MAX_ID_CHARS} chars")
    arrays = _decode_arrays(h.get("arrays", []), frames[1:])
    if "op" in h:
        op = h["op"]
        _check(isinstance(op, str) and op in OPS, f"unknown op {str(op)[:32]!r}; expected one of {OPS}")
        args = h.get("args", {})
        _check(isinstance(args, dict), "'args' must be a map")
        return Message(rid, op, args, arrays)
    ok = h.get("ok")
    _check(isinstance(ok, bool), "reply needs a boolean 'ok' or a request needs an 'op'")
    meta, error, code = h.get("meta", {}), h.get("error", ""), h.get("code", "")
    _check(isinstance(meta, dict), "'meta' must be a map")
    _check(isinstance(error, str), "'error' must be a string")
    _check(isinstance(code, str), "'code' must be a string")
    _check(ok or code in {c.value for c in ErrorCode}, f"unknown error code {code[:32]!r}")
    return Message(rid, "reply", meta, arrays, ok=ok, error=error[:MAX_ERROR_CHARS],
                   code=None if ok else ErrorCode(code))


# ------------------------------------------------------------ server <-> worker

@dataclasses.dataclass
class WorkerMessage:
    """A worker's message to the server: "ready" (with info), "hb", or "reply" (with reply frames)."""
    kind: str
    info: dict | None = None
    frames: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ServerMessage:
    """The server's message to a worker: "task" (with its requests' frames), "who", or "reject"."""
    kind: str
    requests: list = dataclasses.field(default_factory=list)
    error: str = ""


def encode_ready(info: Mapping[str, Any]) -> list:
    return [msgpack.packb({"type": "ready", "v": PROTOCOL_VERSION, "info": dict(info)})]


def encode_heartbeat() -> list:
    return [msgpack.packb({"type": "hb"})]


def encode_worker_reply(reply_frames: Sequence[Any]) -> list:
    return [msgpack.packb({"type": "reply"}), *reply_frames]


def encode_task(requests: Sequence[Sequence[Any]]) -> list:
    return [msgpack.packb({"type": "task", "n_frames": [len(r) for r in requests]}),
            *(f for r in requests for f in r)]


def encode_who() -> list:
    return [msgpack.packb({"type": "who"})]


def encode_reject(error: str) -> list:
    return [msgpack.packb({"type": "reject", "error": error[:MAX_ERROR_CHARS]})]


def _header(frames: Sequence[Any], side: str, kinds: tuple[str, ...]) -> tuple[dict, str]:
    """The checked header map of a `side` ("worker"/"server") message and its type, one of `kinds`."""
    _check(len(frames) >= 1, f"empty {side} message")
    h = _unpack_map(frames[0], f"{side} header")
    kind = h.get("type")
    _check(isinstance(kind, str) and kind in kinds, f"unknown {side} message {str(kind)[:32]!r}")
    return h, kind


def decode_worker_message(frames: Sequence[Any]) -> WorkerMessage:
    """A worker -> server message, checked (ProtocolError for anything else).

    A "ready" message's info is checked by the caller (backends.base.check_info).
    """
    try:
        h, kind = _header(frames, "worker", ("ready", "hb", "reply"))
        if kind == "ready":
            v = h.get("v")
            _check(_is_int(v) and v == PROTOCOL_VERSION,
                   f"worker speaks protocol version {str(v)[:32]}, this server {PROTOCOL_VERSION}",
                   ErrorCode.VERSION_MISMATCH)
            _check(isinstance(h.get("info"), dict), "worker 'ready' needs an 'info' map")
            return WorkerMessage("ready", info=h["info"])
        if kind == "reply":
            _check(len(frames) >= 2, "worker 'reply' carries no reply frames")
            return WorkerMessage("reply", frames=list(frames[1:]))
        _check(len(frames) == 1, "worker heartbeat with extra frames")
        return WorkerMessage("hb")
    except ProtocolError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ProtocolError(f"malformed worker message ({type(e).__name__})") from None


def decode_server_message(frames: Sequence[Any]) -> ServerMessage:
    """A server -> worker message, checked (ProtocolError for anything else)."""
    try:
        h, kind = _header(frames, "server", ("task", "who", "reject"))
        if kind == "reject":
            err = h.get("error", "")
            return ServerMessage("reject", error=err[:MAX_ERROR_CHARS] if isinstance(err, str) else repr(err)[:200])
        if kind == "who":
            return ServerMessage("who")
        n = h.get("n_frames")
        _check(isinstance(n, list) and 0 < len(n) <= MAX_TASK_REQUESTS
               and all(_is_int(k) and 1 <= k <= MAX_ARRAYS + 1 for k in n),
               "task 'n_frames' must be a non-empty list of frame counts")
        _check(sum(n) == len(frames) - 1, f"task names {sum(n)} frames but {len(frames) - 1} follow")
        out, i = [], 1
        for k in n:
            out.append(list(frames[i:i + k]))
            i += k
        return ServerMessage("task", requests=out)
    except ProtocolError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ProtocolError(f"malformed server message ({type(e).__name__})") from None


# ---------------------------------------------------------------- op arguments

def _checked(fn):
    """Op-argument checks raise only ProtocolError, whatever the message holds."""
    def wrapped(msg: Message, info: Mapping) -> dict[str, Any]:
        try:
            return fn(msg, info)
        except ProtocolError:
            raise
        except Exception as e:  # noqa: BLE001 - a check missed a case: still the sender's fault
            raise ProtocolError(f"malformed {msg.op} arguments ({type(e).__name__}: {str(e)[:200]})") from None
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


def _int(args: Mapping, key: str, lo: int, hi: int) -> int:
    v = args.get(key)
    _check(isinstance(v, int) and not isinstance(v, bool), f"{key!r} must be an int, got {type(v).__name__}")
    _check(lo <= v <= hi, f"{key!r}={v} out of range [{lo}, {hi}]")
    return v


def _float(args: Mapping, key: str, lo: float, hi: float, *, open_lo: bool = False) -> float:
    v = args.get(key)
    _check(isinstance(v, (int, float)) and not isinstance(v, bool), f"{key!r} must be a number")
    v = float(v)
    _check(math.isfinite(v) and (v > lo if open_lo else v >= lo) and v <= hi, f"{key!r}={v} out of range")
    return v


def _tokens(arrays: Mapping, ids_key: str, mask_key: str, info: Mapping) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = arrays.get(ids_key), arrays.get(mask_key)
    _check(ids is not None and mask is not None, f"score/generate need arrays {ids_key!r} and {mask_key!r}")
    _check(ids.dtype == np.int32 and mask.dtype == np.int32, f"{ids_key!r}/{mask_key!r} must be int32")
    _check(ids.ndim == 2 and ids.shape == mask.shape and ids.size > 0,
           f"{ids_key!r} {ids.shape} and {mask_key!r} {mask.shape} must be the same non-empty [B, L]")
    _check(ids.size <= MAX_TOKENS, f"B*L={ids.size} exceeds the limit {MAX_TOKENS}")
    _check(ids.shape[1] <= info["max_length"], f"length {ids.shape[1]} exceeds max_length {info['max_length']}")
    lo, hi = int(ids.min()), int(ids.max())
    _check(lo >= 0 and hi < info["vocab_size"],
           f"{ids_key!r}: token ids must be in [0, {info['vocab_size']}), got [{lo}, {hi}]")
    _check(bool(np.isin(mask, (0, 1)).all()), f"{mask_key!r} must hold only 0 and 1")
    return ids, mask


@_checked
def validate_score(msg: Message, info: Mapping) -> dict[str, Any]:
    """Checked score arguments: input_ids, attention_mask, top_k, temperature, completion_start
    (or, for signal "cross", the text arguments of `validate_cross_score`)."""
    if msg.args.get("signal") == "cross":
        return _cross_score(msg, info)
    ids, mask = _tokens(msg.arrays, "input_ids", "attention_mask", info)
    top_k = _int(msg.args, "top_k", 0, min(info["max_top_k"], info["vocab_size"]))
    temperature = _float(msg.args, "temperature", 0.0, 1e4, open_lo=True)
    cs = msg.args.get("completion_start")
    if cs is not None:
        cs = _int(msg.args, "completion_start", 1, ids.shape[1] - 1)
    rows = ids.shape[1] - (cs if cs is not None else 1)
    signal = msg.args.get("signal", "logprobs")
    _check(signal in SIGNALS, f"'signal' must be one of {SIGNALS}, got {str(signal)[:32]!r}")
    if signal == "cross":
        raise ProtocolError("a cross-tokenizer score carries text, not input_ids")
    if signal == "hidden":
        _check(bool(info.get("hidden_size")), "this teacher does not serve hidden states (no hidden_size in info)")
        width = info["hidden_size"] // 4   # bfloat16: half of a float32 value, counted in 8-byte units below
    else:
        width = top_k or info["vocab_size"]
    _check(ids.shape[0] * rows * max(width, 1) <= MAX_MESSAGE_BYTES // 8,
           f"reply of {ids.shape[0]}x{rows}x{width} values is too large; lower top_k or the batch")
    return dict(input_ids=ids, attention_mask=mask, top_k=top_k, temperature=temperature, completion_start=cs,
                signal=signal)


def batch_key(score_args: Mapping[str, Any]) -> tuple:
    """Checked score requests with equal keys can be concatenated into one backend call."""
    a = score_args
    if a.get("signal") == "cross":   # rows are tokenized and padded together by the worker
        return ("score", a["top_k"], a["temperature"], None, a["student_ends"].shape[1], "cross", a["strategy"],
                a["skip_teacher_eos"])
    return ("score", a["top_k"], a["temperature"], a["completion_start"], a["input_ids"].shape[1],
            a.get("signal", "logprobs"))


def request_tokens(score_args: Mapping[str, Any]) -> int:
    """The size of a checked score request, for the server's batching limit."""
    if score_args.get("signal") == "cross":
        return int(score_args["student_ends"].size + score_args["text"].size // 4)
    return int(score_args["input_ids"].size)


# ------------------------------------------------------ cross-tokenizer scores (issue 15)

def _bool(args: Mapping, key: str, default: bool) -> bool:
    v = args.get(key, default)
    _check(isinstance(v, bool), f"{key!r} must be a bool, got {type(v).__name__}")
    return v


def _cross_score(msg: Message, info: Mapping) -> dict[str, Any]:
    """Checked cross-tokenizer score arguments (args signal="cross").

    Arrays: text uint8 [n] (each row's prompt then completion, UTF-8, rows one after another),
    text_offsets int32 [B, 2] (bytes of the row's prompt and of its completion), student_ends int32
    [B, R]: where student completion token r ends, in bytes from the completion's start; -1 = inside
    a character (no boundary), -2 = not scored (padding, a skipped EOS). Args: top_k, temperature,
    strategy (observed | bayesian), skip_teacher_eos.
    """
    _check(bool(info.get("cross_tokenizer")), "this teacher cannot score text (its backend has no tokenizer): "
           "cross-tokenizer distillation (gold.cross_tokenizer) needs a teacher backend that serves it")
    a = msg.arrays
    text, offs, ends = a.get("text"), a.get("text_offsets"), a.get("student_ends")
    _check(text is not None and offs is not None and ends is not None,
           "a cross score needs arrays 'text', 'text_offsets' and 'student_ends'")
    _check(text.dtype == DTYPES["uint8"] and text.ndim == 1, "'text' must be uint8 [n]")
    _check(offs.dtype == np.int32 and offs.ndim == 2 and offs.shape[1] == 2 and offs.shape[0] >= 1,
           "'text_offsets' must be int32 [B, 2]")
    _check(ends.dtype == np.int32 and ends.ndim == 2 and ends.shape[0] == offs.shape[0] and ends.shape[1] >= 1,
           f"'student_ends' must be int32 [B, R] with B={offs.shape[0]}")
    _check(ends.size <= MAX_TOKENS, f"B*R={ends.size} exceeds the limit {MAX_TOKENS}")
    _check(bool((offs >= 0).all()) and int(offs.sum()) == text.size,
           f"'text_offsets' must be >= 0 and add up to the {text.size} text bytes")
    _check(bool((ends >= -2).all()) and bool((ends <= offs[:, 1:2]).all()),
           "'student_ends' must lie in [-2, the row's completion bytes]")
    raw, pos, pieces = bytes(text), 0, []
    for b, (n_p, n_c) in enumerate(offs.tolist()):
        try:
            pieces.append((raw[pos:pos + n_p].decode("utf-8"), raw[pos + n_p:pos + n_p + n_c].decode("utf-8")))
        except UnicodeDecodeError as e:
            raise ProtocolError(f"row {b}: the text is not valid UTF-8 ({e.reason})") from None
        pos += n_p + n_c
    top_k = _int(msg.args, "top_k", 1, min(info["max_top_k"], info["vocab_size"]))
    temperature = _float(msg.args, "temperature", 0.0, 1e4, open_lo=True)
    strategy = msg.args.get("strategy", "observed")
    _check(strategy in MERGE_STRATEGIES, f"'strategy' must be one of {MERGE_STRATEGIES}, got {str(strategy)[:32]!r}")
    _check(ends.size * (top_k + 4) <= MAX_MESSAGE_BYTES // 8,
           f"reply of {ends.shape[0]}x{ends.shape[1]}x{top_k} values is too large; lower top_k or the batch")
    return dict(text=text, text_offsets=offs, student_ends=ends, pieces=pieces, top_k=top_k,
                temperature=temperature, strategy=strategy, signal="cross",
                skip_teacher_eos=_bool(msg.args, "skip_teacher_eos", True))


CROSS_REPLY = ("logprobs", "ids", "topk_logmass", "logscale", "span_id", "span_base", "loss_mask", "unaligned",
               "scored")


def cross_scores_from_message(msg: Message, *, batch: int, rows: int, top_k: int) -> TeacherScores:
    """A cross score reply: per student position the teacher's aligned top-k (teacher ids, -1 none), its
    log-mass, the span's log-scale, span ids and the loss mask; per row the unaligned and scored counts."""
    a = msg.arrays
    _check(all(k in a for k in CROSS_REPLY), f"cross score reply lacks one of {CROSS_REPLY}")
    want = {"logprobs": ((batch, rows, top_k), np.float32), "ids": ((batch, rows, top_k), np.int32),
            "topk_logmass": ((batch, rows), np.float32), "logscale": ((batch, rows), np.float32),
            "span_id": ((batch, rows), np.int32), "span_base": ((batch, rows), np.int32),
            "loss_mask": ((batch, rows), np.float32),
            "unaligned": ((batch,), np.int32), "scored": ((batch,), np.int32)}
    for k, (shape, dt) in want.items():
        _check(a[k].shape == shape and a[k].dtype == dt,
               f"cross score reply {k!r}: {a[k].dtype}{list(a[k].shape)}, expected {np.dtype(dt)}{list(shape)}")
    cross = {k: a[k] for k in ("logscale", "span_id", "span_base", "loss_mask", "unaligned", "scored")}
    return TeacherScores(logprobs=a["logprobs"], ids=a["ids"], topk_logmass=a["topk_logmass"], token_logprob=None,
                         cross=cross)


@_checked
def validate_vocab(msg: Message, info: Mapping) -> dict[str, Any]:
    """The `vocab` op takes no arguments; only a teacher that scores text serves it."""
    _check(bool(info.get("cross_tokenizer")), "this teacher does not serve its vocabulary (no tokenizer)")
    return {}


def vocab_to_arrays(vocab: Mapping[str, int]) -> dict[str, np.ndarray]:
    """token string -> id as arrays: the UTF-8 strings concatenated, their end offsets, their ids."""
    items = sorted(vocab.items(), key=lambda kv: kv[1])
    raw = [s.encode("utf-8") for s, _ in items]
    ends = np.cumsum([len(r) for r in raw], dtype=np.int64)
    _check(not len(ends) or ends[-1] <= MAX_VOCAB_BYTES, "the vocabulary is too large to send")
    return {"vocab_text": np.frombuffer(b"".join(raw), np.uint8), "vocab_ends": ends.astype(np.int32),
            "vocab_ids": np.asarray([i for _, i in items], np.int32)}


def vocab_from_message(msg: Message, *, vocab_size: int) -> dict[str, int]:
    a = msg.arrays
    text, ends, ids = a.get("vocab_text"), a.get("vocab_ends"), a.get("vocab_ids")
    _check(text is not None and ends is not None and ids is not None, "vocab reply lacks its arrays")
    _check(text.dtype == DTYPES["uint8"] and ends.dtype == np.int32 and ids.dtype == np.int32
           and ends.shape == ids.shape and ends.ndim == 1, "vocab reply arrays have the wrong dtypes or shapes")
    _check(len(ids) == 0 or (int(ids.min()) >= 0 and int(ids.max()) < vocab_size),
           f"vocab reply ids must lie in [0, {vocab_size})")
    _check(bool(np.all(np.diff(ends) >= 0)) and (len(ends) == 0 or (ends[0] >= 0 and ends[-1] == text.size)),
           "vocab reply offsets are not increasing up to the text size")
    raw, out, start = bytes(text), {}, 0
    for e, i in zip(ends.tolist(), ids.tolist()):
        out[raw[start:e].decode("utf-8", errors="strict")] = i
        start = e
    return out


@_checked
def validate_generate(msg: Message, info: Mapping) -> dict[str, Any]:
    """Checked generate arguments: prompt_ids, prompt_mask and the sampling settings."""
    ids, mask = _tokens(msg.arrays, "prompt_ids", "prompt_mask", info)
    return dict(prompt_ids=ids, prompt_mask=mask,
                max_new_tokens=_int(msg.args, "max_new_tokens", 1, min(MAX_NEW_TOKENS, info["max_length"])),
                temperature=_float(msg.args, "temperature", 0.0, 1e4),
                top_p=_float(msg.args, "top_p", 0.0, 1.0, open_lo=True),
                top_k=_int(msg.args, "top_k", 0, 1 << 20),
                seed=_int(msg.args, "seed", -(1 << 62), 1 << 62))


HEAD_MAX_BYTES = MAX_MESSAGE_BYTES // 2   # one `head` reply: a slice of the head's columns


@_checked
def validate_head(msg: Message, info: Mapping) -> dict[str, Any]:
    """Checked `head` arguments: columns [start, start + count) of the teacher's lm head [H, V]."""
    h, v = info.get("hidden_size"), info.get("embedding_size")
    _check(bool(h), "this teacher does not serve its head (no hidden_size in info)")
    start = _int(msg.args, "start", 0, v - 1)
    count = _int(msg.args, "count", 1, v - start)
    _check(count * h * 4 <= HEAD_MAX_BYTES, f"head slice of {count} columns is too large; at most "
           f"{HEAD_MAX_BYTES // (4 * h)} per request")
    return dict(start=start, count=count)


def head_from_message(msg: Message, *, hidden_size: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(head columns [H, count], final norm [H]) of a `head` reply."""
    w, n = msg.arrays.get("head"), msg.arrays.get("norm")
    _check(w is not None and n is not None, "head reply lacks 'head' or 'norm'")
    _check(w.shape == (hidden_size, count) and n.shape == (hidden_size,),
           f"head reply has shapes {w.shape} and {n.shape}, expected ({hidden_size}, {count}) and ({hidden_size},)")
    _check(w.dtype != np.int32 and n.dtype != np.int32, "head reply must be floating point")
    return w, n


# ------------------------------------------------------- containers <-> arrays

def scores_to_arrays(s: TeacherScores) -> dict[str, np.ndarray]:
    return {"logprobs": s.logprobs, "ids": s.ids, "topk_logmass": s.topk_logmass, "token_logprob": s.token_logprob,
            "hidden": getattr(s, "hidden", None)}


def scores_from_message(msg: Message, *, batch: int, rows: int, top_k: int,
                        signal: str = "logprobs", hidden_size: int | None = None) -> TeacherScores:
    a = msg.arrays
    if signal == "hidden":
        h = a.get("hidden")
        _check(h is not None and h.dtype == DTYPES["bfloat16"], "score reply lacks bfloat16 'hidden' states")
        _check(h.ndim == 3 and h.shape[:2] == (batch, rows) and (hidden_size is None or h.shape[2] == hidden_size),
               f"score reply 'hidden' has shape {h.shape}, expected ({batch}, {rows}, {hidden_size or 'H'})")
        return TeacherScores(logprobs=None, ids=None, topk_logmass=None, token_logprob=None, hidden=h)
    lp, tok = a.get("logprobs"), a.get("token_logprob")
    _check(lp is not None and tok is not None, "score reply lacks 'logprobs' or 'token_logprob'")
    _check(lp.dtype == np.float32 and tok.dtype == np.float32, "score reply log-probs must be float32")
    _check(lp.ndim == 3 and lp.shape[:2] == (batch, rows) and (top_k == 0 or lp.shape[2] == top_k),
           f"score reply 'logprobs' has shape {lp.shape}, expected ({batch}, {rows}, {top_k or 'V'})")
    _check(tok.shape == (batch, rows), f"score reply 'token_logprob' has shape {tok.shape}")
    ids, mass = a.get("ids"), a.get("topk_logmass")
    if top_k:
        _check(ids is not None and ids.shape == lp.shape and ids.dtype == np.int32,
               "score reply lacks int32 top-k 'ids' of the right shape")
        _check(mass is not None and mass.shape == (batch, rows) and mass.dtype == np.float32,
               "score reply lacks a float32 'topk_logmass' of the right shape")
    return TeacherScores(logprobs=lp, ids=ids if top_k else None,
                         topk_logmass=mass if top_k else None, token_logprob=tok)


def rollout_to_arrays(r: RolloutResult) -> dict[str, np.ndarray]:
    return {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}


def rollout_from_message(msg: Message) -> RolloutResult:
    a = msg.arrays
    need = [f.name for f in dataclasses.fields(SequenceBatch)]
    _check(all(k in a for k in need), f"generate reply lacks one of {need}")
    b, r = a["prompt_ids"].shape[0] if a["prompt_ids"].ndim == 2 else -1, a["completion_ids"].shape[-1]
    for k in need:
        _check(a[k].dtype == np.int32 and a[k].ndim == 2 and a[k].shape[0] == b, f"generate reply {k!r}: bad shape")
    _check(a["prompt_mask"].shape == a["prompt_ids"].shape and a["completion_mask"].shape == (b, r),
           "generate reply masks do not match their ids")
    if "logprobs" in a:
        _check(a["logprobs"].shape == (b, r), "generate reply 'logprobs' has the wrong shape")
    if "finish_reason" in a:
        _check(a["finish_reason"].shape == (b,), "generate reply 'finish_reason' has the wrong shape")
    return RolloutResult(**{k: v for k, v in a.items() if k in {f.name for f in dataclasses.fields(RolloutResult)}})

"""Teacher wire format: versioned msgpack headers followed by raw array frames.

A message is a list of ZeroMQ frames: frame 0 is a msgpack map, frames 1..n
are the raw little-endian bytes of the arrays it names (``[name, dtype,
shape]``), so arrays travel without a copy into msgpack and never through
pickle. Every decoded field is validated before use: a hostile or broken peer
gets an error reply, never a crash or an allocation it chose.

    request: {"v": 1, "id": str, "op": str, "args": {...}, "arrays": [[name, dtype, shape], ...]}
    reply:   {"v": 1, "id": str, "ok": bool, "error": str, "meta": {...}, "arrays": [...]}
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

from gold_jax.types import RolloutResult, SequenceBatch, TeacherScores

PROTOCOL_VERSION = 1
OPS = ("info", "score", "generate", "ping")
DTYPES = {"int32": np.dtype("<i4"), "float32": np.dtype("<f4")}

MAX_MESSAGE_BYTES = 256 << 20   # whole request, header plus arrays
MAX_HEADER_BYTES = 64 << 10
MAX_TOKENS = 1 << 22            # B * L of one request
MAX_TOP_K = 1024
MAX_ARRAYS = 16
MAX_NEW_TOKENS = 1 << 16


class ProtocolError(ValueError):
    """A message that does not follow the protocol (reported back to the sender)."""


@dataclasses.dataclass
class Message:
    id: str
    op: str                 # request op, or "reply"
    args: dict[str, Any]    # request args / reply meta
    arrays: dict[str, np.ndarray]
    ok: bool = True
    error: str = ""


def _array_specs(arrays: Mapping[str, np.ndarray]) -> tuple[list, list]:
    specs, frames = [], []
    for name, a in arrays.items():
        if a is None:
            continue
        a = np.asarray(a)
        dt = {np.dtype(np.int32): "int32", np.dtype(np.float32): "float32"}.get(a.dtype.newbyteorder("="))
        if dt is None:
            raise TypeError(f"array {name!r}: dtype {a.dtype} is not sendable (int32 or float32 only)")
        a = np.ascontiguousarray(a, dtype=DTYPES[dt])
        specs.append([name, dt, list(a.shape)])
        frames.append(memoryview(a).cast("B") if a.size else b"")
    return specs, frames


def encode_request(req_id: str, op: str, args: Mapping[str, Any] | None = None,
                   arrays: Mapping[str, np.ndarray] | None = None) -> list:
    specs, frames = _array_specs(arrays or {})
    header = {"v": PROTOCOL_VERSION, "id": req_id, "op": op, "args": dict(args or {}), "arrays": specs}
    return [msgpack.packb(header, use_bin_type=True), *frames]


def encode_reply(req_id: str, *, meta: Mapping[str, Any] | None = None,
                 arrays: Mapping[str, np.ndarray] | None = None, error: str = "") -> list:
    specs, frames = _array_specs(arrays or {}) if not error else ([], [])
    header = {"v": PROTOCOL_VERSION, "id": req_id, "ok": not error, "error": error,
              "meta": dict(meta or {}), "arrays": specs}
    return [msgpack.packb(header, use_bin_type=True), *frames]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ProtocolError(msg)


def peek_id(frame: bytes) -> str:
    """Best-effort request id of a header frame (for error replies to bad messages)."""
    try:
        h = msgpack.unpackb(bytes(frame[:MAX_HEADER_BYTES]), raw=False)
        rid = h.get("id", "") if isinstance(h, dict) else ""
        return rid if isinstance(rid, str) and len(rid) <= 128 else ""
    except Exception:  # noqa: BLE001 - any garbage means "no id"
        return ""


def decode(frames: Sequence[bytes], *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate the framing of a request or reply (not the op's arguments)."""
    _check(len(frames) >= 1, "empty message")
    total = sum(len(f) for f in frames)
    _check(total <= max_bytes, f"message of {total} bytes exceeds the limit of {max_bytes} bytes")
    _check(len(frames[0]) <= MAX_HEADER_BYTES, f"header of {len(frames[0])} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        h = msgpack.unpackb(bytes(frames[0]), raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 - msgpack raises several types
        raise ProtocolError(f"header is not valid msgpack: {type(e).__name__}") from None
    _check(isinstance(h, dict), "header must be a msgpack map")
    _check(h.get("v") == PROTOCOL_VERSION, f"protocol version {h.get('v')!r} != {PROTOCOL_VERSION}")
    rid = h.get("id")
    _check(isinstance(rid, str) and 0 < len(rid) <= 128, "'id' must be a non-empty string of <= 128 chars")
    specs = h.get("arrays", [])
    _check(isinstance(specs, list) and len(specs) <= MAX_ARRAYS, "'arrays' must be a list of <= 16 specs")
    _check(len(specs) == len(frames) - 1, f"header names {len(specs)} arrays but {len(frames) - 1} frames follow")
    arrays: dict[str, np.ndarray] = {}
    for spec, buf in zip(specs, frames[1:]):
        _check(isinstance(spec, list) and len(spec) == 3, "array spec must be [name, dtype, shape]")
        name, dt, shape = spec
        _check(isinstance(name, str) and name not in arrays, f"bad or duplicate array name {name!r}")
        _check(dt in DTYPES, f"array {name!r}: dtype {dt!r} not allowed (int32, float32)")
        _check(isinstance(shape, list) and len(shape) <= 4
               and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31 for d in shape),
               f"array {name!r}: bad shape {shape!r}")
        nbytes = math.prod(shape) * DTYPES[dt].itemsize
        _check(nbytes == len(buf), f"array {name!r}: shape {shape} {dt} needs {nbytes} bytes, got {len(buf)}")
        arrays[name] = np.frombuffer(buf, dtype=DTYPES[dt]).reshape(shape)
    if "op" in h:
        _check(h["op"] in OPS, f"unknown op {h['op']!r}; expected one of {OPS}")
        args = h.get("args", {})
        _check(isinstance(args, dict), "'args' must be a map")
        return Message(rid, h["op"], args, arrays)
    _check(isinstance(h.get("ok"), bool), "reply needs a boolean 'ok' or a request needs an 'op'")
    meta = h.get("meta", {})
    _check(isinstance(meta, dict), "'meta' must be a map")
    return Message(rid, "reply", meta, arrays, ok=h["ok"], error=str(h.get("error", ""))[:4096])


# ---------------------------------------------------------------- op arguments

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


def validate_score(msg: Message, info: Mapping) -> dict[str, Any]:
    """Checked score arguments: input_ids, attention_mask, top_k, temperature, completion_start."""
    ids, mask = _tokens(msg.arrays, "input_ids", "attention_mask", info)
    top_k = _int(msg.args, "top_k", 0, min(info["max_top_k"], info["vocab_size"]))
    temperature = _float(msg.args, "temperature", 0.0, 1e4, open_lo=True)
    cs = msg.args.get("completion_start")
    if cs is not None:
        cs = _int(msg.args, "completion_start", 1, ids.shape[1] - 1)
    rows = ids.shape[1] - (cs if cs is not None else 1)
    width = top_k or info["vocab_size"]
    _check(ids.shape[0] * rows * width <= MAX_MESSAGE_BYTES // 8,
           f"reply of {ids.shape[0]}x{rows}x{width} values is too large; lower top_k or the batch")
    return dict(input_ids=ids, attention_mask=mask, top_k=top_k, temperature=temperature, completion_start=cs)


def validate_generate(msg: Message, info: Mapping) -> dict[str, Any]:
    ids, mask = _tokens(msg.arrays, "prompt_ids", "prompt_mask", info)
    return dict(prompt_ids=ids, prompt_mask=mask,
                max_new_tokens=_int(msg.args, "max_new_tokens", 1, min(MAX_NEW_TOKENS, info["max_length"])),
                temperature=_float(msg.args, "temperature", 0.0, 1e4),
                top_p=_float(msg.args, "top_p", 0.0, 1.0, open_lo=True),
                top_k=_int(msg.args, "top_k", 0, 1 << 20),
                seed=_int(msg.args, "seed", -(1 << 62), 1 << 62))


# ------------------------------------------------------- containers <-> arrays

def scores_to_arrays(s: TeacherScores) -> dict[str, np.ndarray]:
    return {"logprobs": s.logprobs, "ids": s.ids, "topk_logmass": s.topk_logmass, "token_logprob": s.token_logprob}


def scores_from_message(msg: Message, *, batch: int, rows: int, top_k: int) -> TeacherScores:
    a = msg.arrays
    lp, tok = a.get("logprobs"), a.get("token_logprob")
    _check(lp is not None and tok is not None, "score reply lacks 'logprobs' or 'token_logprob'")
    _check(lp.ndim == 3 and lp.shape[:2] == (batch, rows) and (top_k == 0 or lp.shape[2] == top_k),
           f"score reply 'logprobs' has shape {lp.shape}, expected ({batch}, {rows}, {top_k or 'V'})")
    _check(tok.shape == (batch, rows), f"score reply 'token_logprob' has shape {tok.shape}")
    ids, mass = a.get("ids"), a.get("topk_logmass")
    if top_k:
        _check(ids is not None and ids.shape == lp.shape, "score reply lacks top-k 'ids' of the right shape")
        _check(mass is not None and mass.shape == (batch, rows), "score reply lacks 'topk_logmass'")
    return TeacherScores(logprobs=lp, ids=ids if top_k else None,
                         topk_logmass=mass if top_k else None, token_logprob=tok)


def rollout_to_arrays(r: RolloutResult) -> dict[str, np.ndarray]:
    return {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}


def rollout_from_message(msg: Message) -> RolloutResult:
    a = msg.arrays
    need = [f.name for f in dataclasses.fields(SequenceBatch)]
    _check(all(k in a for k in need), f"generate reply lacks one of {need}")
    return RolloutResult(**{k: v for k, v in a.items() if k in {f.name for f in dataclasses.fields(RolloutResult)}})

"""The one JSON codec for host state that holds bytes (grain iterator states) and NumPy scalars.

Bytes become {"__b64__": base64 text}; NumPy integers and floats become Python
numbers. Used by the data iterator's state (gold_jax.data.pipeline) and the
checkpoint's host item (gold_jax.checkpoint).
"""
from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

_TAG = "__b64__"
_OLD_TAGS = ("__bytes__",)   # iterator states written before this module (data.pipeline's old tag)


def encode(obj: Any) -> Any:
    """JSON-safe copy of `obj` (dicts get string keys, tuples become lists)."""
    if isinstance(obj, bytes):
        return {_TAG: base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot store a value of type {type(obj).__name__} as JSON")


def decode(obj: Any) -> Any:
    """Inverse of `encode` (tuples come back as lists)."""
    if isinstance(obj, dict):
        if len(obj) == 1:
            (k, v), = obj.items()
            if k == _TAG or k in _OLD_TAGS:
                return base64.b64decode(v)
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(encode(obj), sort_keys=True)


def loads(text: str) -> Any:
    return decode(json.loads(text))

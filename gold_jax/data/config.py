"""The `data` config section and its validation."""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

FORMATS = ("auto", "verl", "messages", "prompt_completion", "text")
TRUNCATIONS = ("left", "right", "drop")


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults for the trainer's `data` section; every field is overridable."""
    c = ml_collections.ConfigDict()
    # Local parquet/jsonl paths: a list, or one comma-separated string (globs allowed).
    c.train_files = config_dict.placeholder(object)
    c.val_files = config_dict.placeholder(object)
    # "auto" detects per file: "messages" column -> messages; prompt + completion
    # column -> verl (chat-list prompt) / prompt_completion; text_key -> text.
    c.format = "auto"
    c.prompt_key = "prompt"
    # Completion column; dotted paths reach into nested columns ("reward_model.ground_truth").
    # For prompt_completion rows without this column, TRL's "completion" column is used.
    c.response_key = "response"
    c.messages_key = "messages"
    c.text_key = "text"
    c.max_prompt_length = 512
    c.max_response_length = 512
    # Over-long prompts: "left" keeps the end (closest to the answer), "right" keeps
    # the start, "drop" reports the row as bad. Responses use response_truncation.
    c.truncation = "left"
    c.response_truncation = "right"
    # Bucket lengths (padding targets). None -> powers of two from min_bucket to the max,
    # so jit sees at most a handful of shapes.
    c.prompt_buckets = config_dict.placeholder(object)
    c.response_buckets = config_dict.placeholder(object)
    c.min_bucket = 16
    c.shuffle = True
    c.seed = 0
    c.num_workers = 0          # grain worker processes; 0 = in-process (threads only)
    c.num_threads = 2          # grain reader threads per process
    # Chat template, as in TRL: "auto" templates conversational rows (lists of role/content
    # messages) only and leaves plain-string rows as they are; True templates plain rows too
    # (as one user turn and one assistant turn); False templates nothing.
    c.chat_template = config_dict.FieldReference("auto", field_type=object)
    # Extra keyword arguments of every apply_chat_template call, e.g. {"enable_thinking": False}
    # for Qwen3 (a dict, or its JSON text on the command line).
    c.chat_template_kwargs = config_dict.placeholder(object)
    return c


def template_kwargs(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """data.chat_template_kwargs as a plain dict ({} when unset)."""
    kw = cfg.get("chat_template_kwargs")
    if kw is None or kw == "":
        return {}
    if isinstance(kw, str):
        try:
            kw = json.loads(kw)
        except ValueError as e:
            raise ValueError(f"data.chat_template_kwargs: {kw!r} is not a JSON object ({e})") from None
    if isinstance(kw, ml_collections.ConfigDict):
        kw = kw.to_dict()
    if not isinstance(kw, Mapping) or not all(isinstance(k, str) for k in kw):
        raise ValueError(f"data.chat_template_kwargs must be a dict with string keys, got {kw!r}")
    return dict(kw)


def parse_files(files: Any, key: str = "data.train_files") -> list[str]:
    """Normalise a list / comma-separated string of paths (globs expanded); all must exist."""
    if files is None or files == "" or files == []:
        raise ValueError(f"{key} is empty: give one or more parquet/jsonl paths")
    if isinstance(files, str):
        items = [f.strip() for f in files.split(",") if f.strip()]
    elif isinstance(files, Sequence) and all(isinstance(f, (str, os.PathLike)) for f in files):
        items = [os.fspath(f) for f in files]
    else:
        raise TypeError(f"{key} must be a list of paths or a comma-separated string, got {files!r}")
    out: list[str] = []
    for item in items:
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise ValueError(f"{key}: file {item!r} does not exist")
        out.extend(matches)
    return out


def make_buckets(buckets: Any, max_len: int, min_bucket: int, key: str) -> list[int]:
    """Sorted bucket lengths whose largest is >= max_len."""
    if buckets is None or (isinstance(buckets, (list, tuple)) and not buckets):
        b, out = max(1, min(min_bucket, max_len)), []
        while b < max_len:
            out.append(b)
            b *= 2
        return out + [max_len]
    if not isinstance(buckets, (list, tuple)) or not all(isinstance(x, int) and x > 0 for x in buckets):
        raise TypeError(f"{key} must be a list of positive ints, got {buckets!r}")
    out = sorted(set(buckets))
    if out[-1] < max_len:
        raise ValueError(f"{key}: largest bucket {out[-1]} is below the max length {max_len}")
    return out


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Fail at start-up with the offending key named."""
    if cfg.format not in FORMATS:
        raise ValueError(f"data.format must be one of {FORMATS}, got {cfg.format!r}")
    for k in ("truncation", "response_truncation"):
        if cfg[k] not in TRUNCATIONS:
            raise ValueError(f"data.{k} must be one of {TRUNCATIONS}, got {cfg[k]!r}")
    for k in ("max_prompt_length", "max_response_length", "min_bucket"):
        if not isinstance(cfg[k], int) or cfg[k] <= 0:
            raise ValueError(f"data.{k} must be a positive int, got {cfg[k]!r}")
    for k in ("num_workers", "num_threads"):
        if not isinstance(cfg[k], int) or cfg[k] < 0:
            raise ValueError(f"data.{k} must be an int >= 0, got {cfg[k]!r}")
    if cfg.chat_template not in ("auto", True, False):
        raise ValueError(f"data.chat_template must be 'auto', True or False, got {cfg.chat_template!r}")
    template_kwargs(cfg)
    for k in ("prompt_key", "response_key", "messages_key", "text_key"):
        if not isinstance(cfg[k], str) or not cfg[k]:
            raise ValueError(f"data.{k} must be a non-empty string, got {cfg[k]!r}")

"""Dataset formats (verl, TRL messages / prompt-completion, plain text) -> prompt and completion text.

A row becomes (prompt_text, completion_text, append_eos). Conversational rows go
through the tokenizer's chat template: the prompt is rendered with
add_generation_prompt=True and the completion is what the full conversation adds
after it, so the completion ends with the template's turn end (<|im_end|>).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from gold_jax.data.sources import BadRow

Messages = list[dict[str, str]]


def get_path(row: Mapping[str, Any], key: str) -> Any:
    """row[key], or a nested lookup for dotted keys ("reward_model.ground_truth")."""
    if key in row:
        return row[key]
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise BadRow("missing_column", f"no column {key!r} (columns: {sorted(row)})")
        node = node[part]
    return node


def has_path(row: Mapping[str, Any], key: str) -> bool:
    try:
        get_path(row, key)
        return True
    except BadRow:
        return False


def is_messages(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in x)


def detect_format(row: Any, cfg: ml_collections.ConfigDict, path: str) -> str:
    """Format of a file from its first readable row."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{path}: cannot detect the data format, first row is not an object")
    if cfg.messages_key in row:
        return "messages"
    if cfg.prompt_key in row and (has_path(row, cfg.response_key) or "completion" in row):
        if isinstance(row[cfg.prompt_key], list) and has_path(row, cfg.response_key):
            return "verl"
        return "prompt_completion"
    if cfg.text_key in row:
        return "text"
    raise ValueError(
        f"{path}: cannot detect the data format from columns {sorted(row)}; expected "
        f"{cfg.messages_key!r}, {cfg.prompt_key!r} + {cfg.response_key!r}/'completion', or {cfg.text_key!r} "
        "(set data.format and the data.*_key fields)")


def _text_or_messages(x: Any, what: str, key: str) -> str | Messages:
    if isinstance(x, str):
        if not x.strip():
            raise BadRow(f"empty_{what}", f"column {key!r} is empty")
        return x
    if is_messages(x):
        if not any(m["content"].strip() for m in x):
            raise BadRow(f"empty_{what}", f"column {key!r} has only empty messages")
        return list(x)
    if isinstance(x, list) and not x:
        raise BadRow(f"empty_{what}", f"column {key!r} is an empty list")
    raise BadRow("wrong_type", f"column {key!r} must be a string or a list of "
                 f"{{'role': str, 'content': str}} messages, got {type(x).__name__}")


def split_row(row: Any, fmt: str, cfg: ml_collections.ConfigDict) -> tuple[str | Messages | None, str | Messages]:
    """(prompt, completion); prompt None for plain text rows."""
    if not isinstance(row, Mapping):
        raise BadRow("wrong_type", f"row is a {type(row).__name__}, not an object")
    if fmt == "text":
        return None, _text_or_messages(get_path(row, cfg.text_key), "completion", cfg.text_key)
    if fmt == "messages":
        msgs = get_path(row, cfg.messages_key)
        if not is_messages(msgs):
            raise BadRow("wrong_type", f"column {cfg.messages_key!r} must be a non-empty list of "
                         "{'role': str, 'content': str} messages")
        if msgs[-1]["role"] != "assistant":
            raise BadRow("no_assistant_completion", f"last message has role {msgs[-1]['role']!r}, not 'assistant'")
        if len(msgs) < 2:
            raise BadRow("empty_prompt", "only an assistant message, no prompt turns")
        if not msgs[-1]["content"].strip():
            raise BadRow("empty_completion", "last assistant message is empty")
        return list(msgs[:-1]), [msgs[-1]]
    key = cfg.response_key
    if fmt == "prompt_completion" and not has_path(row, key) and "completion" in row:
        key = "completion"
    prompt = _text_or_messages(get_path(row, cfg.prompt_key), "prompt", cfg.prompt_key)
    return prompt, _text_or_messages(get_path(row, key), "completion", key)


def render(tokenizer: Any, prompt: str | Messages | None, completion: str | Messages,
           apply_chat_template: bool) -> tuple[str | None, str, bool]:
    """(prompt_text, completion_text, append_eos) for one row."""
    conversational = isinstance(prompt, list) or isinstance(completion, list)
    if prompt is None or not (conversational or apply_chat_template):
        if conversational:
            raise ValueError("conversational data needs data.apply_chat_template=True")
        return prompt, completion, True
    if conversational and not apply_chat_template:
        raise ValueError("conversational data needs data.apply_chat_template=True")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; set one or use data.apply_chat_template=False")
    p_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    c_msgs = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
    p_text = tokenizer.apply_chat_template(p_msgs, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(p_msgs + c_msgs, tokenize=False)
    if not full.startswith(p_text):
        raise BadRow("template_mismatch", "the chat template renders the prompt differently inside the "
                     "full conversation, so the completion cannot be split off")
    return p_text, full[len(p_text):], False

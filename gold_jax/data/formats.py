"""Dataset formats (verl, TRL messages / prompt-completion, plain text) -> prompt and completion text.

A row becomes (prompt_text, completion_text, append_eos). As in TRL, only
conversational rows (lists of {"role", "content"} messages) go through the
tokenizer's chat template; plain-string prompt/completion rows are used as
they are, with an EOS appended, unless `data.chat_template=True` opts them in
(`"auto"`, the default: conversational rows only; `False`: never, and
conversational rows are an error). The prompt is rendered with
add_generation_prompt=True and the completion is what the full conversation
adds after it, so the completion ends with the template's turn end
(<|im_end|>). `data.chat_template_kwargs` go to every apply_chat_template call
(e.g. {"enable_thinking": False} for Qwen3). Prompt-only rows (no completion
column) are accepted when the run never uses dataset completions (gold.lmbda=1
or gold.seq_kd): their completion is None.
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


class NoCompletions(ValueError):
    """Rows have prompts but no completions, and the run needs dataset completions."""


def no_completions_error(path: str, cfg: ml_collections.ConfigDict, columns: Any) -> NoCompletions:
    return NoCompletions(
        f"{path}: rows have a {cfg.prompt_key!r} column but no completion (data.response_key="
        f"{cfg.response_key!r}, nor 'completion'; columns {sorted(columns)}). Off-policy steps (gold.lmbda < 1 "
        "without gold.seq_kd) train on dataset completions: set data.response_key to the completion column, "
        "or use gold.lmbda=1 (or gold.seq_kd=True) for prompt-only data")


def detect_format(row: Any, cfg: ml_collections.ConfigDict, path: str, require_response: bool = True) -> str:
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
    if cfg.prompt_key in row:   # prompt-only (verl RL-style parquet)
        if require_response:
            raise no_completions_error(path, cfg, row)
        return "verl" if isinstance(row[cfg.prompt_key], list) else "prompt_completion"
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


def split_row(row: Any, fmt: str, cfg: ml_collections.ConfigDict, require_response: bool = True
              ) -> tuple[str | Messages | None, str | Messages | None]:
    """(prompt, completion); prompt None for plain text rows, completion None for prompt-only rows."""
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
        # The same rule as a verl prompt column: prompt turns with no text are an empty prompt.
        prompt = _text_or_messages(list(msgs[:-1]), "prompt", cfg.messages_key)
        return prompt, [msgs[-1]]
    key = cfg.response_key
    if fmt == "prompt_completion" and not has_path(row, key) and "completion" in row:
        key = "completion"
    prompt = _text_or_messages(get_path(row, cfg.prompt_key), "prompt", cfg.prompt_key)
    if not require_response and not has_path(row, key):
        return prompt, None
    return prompt, _text_or_messages(get_path(row, key), "completion", key)


def render(tokenizer: Any, prompt: str | Messages | None, completion: str | Messages | None,
           chat_template: bool | str = "auto", template_kwargs: Mapping[str, Any] | None = None
           ) -> tuple[str | None, str, bool]:
    """(prompt_text, completion_text, append_eos) for one row; completion None gives ""."""
    conversational = isinstance(prompt, list) or isinstance(completion, list)
    if conversational and chat_template is False:
        raise ValueError("conversational data needs data.chat_template='auto' or True")
    if prompt is None or not (conversational or chat_template is True):
        return prompt, completion or "", True
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; set one, or use plain-string rows with "
                         "data.chat_template='auto' or False")
    kw = dict(template_kwargs or {})
    p_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    p_text = tokenizer.apply_chat_template(p_msgs, tokenize=False, add_generation_prompt=True, **kw)
    if completion is None:
        return p_text, "", False
    c_msgs = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
    full = tokenizer.apply_chat_template(p_msgs + c_msgs, tokenize=False, **kw)
    if not full.startswith(p_text):
        raise BadRow("template_mismatch", "the chat template renders the prompt differently inside the "
                     "full conversation, so the completion cannot be split off")
    return p_text, full[len(p_text):], False

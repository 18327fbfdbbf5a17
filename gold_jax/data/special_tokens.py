"""EOS and pad ids for tokenizers as models ship them.

Real tokenizers often lack a pad token (Llama 3) and models stop on several
EOS ids (Llama 3.2 Instruct: [128001, 128008, 128009]; Qwen2.5 Instruct:
<|im_end|> and <|endoftext|>). The EOS set is the union of the tokenizer's
eos_token and the `eos_token_id` of config.json / generation_config.json next
to it (a list or an int). A missing pad is picked as the ecosystem does: a
reserved special token when the vocabulary has one (never seen in text, so it
cannot be confused with a real token), else the EOS id, with the masks saying
which positions are real. Only a tokenizer with no EOS at all is refused.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any

from absl import logging

EOS_ATTR = "gold_eos_token_ids"       # attribute carrying the full EOS set on a loaded tokenizer
AUTO_PAD_ATTR = "gold_auto_pad"       # the pad token we picked (None: the tokenizer had one)
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|finetune_right_pad|>", "<|pad|>", "<pad>", "[PAD]")
_RESERVED = re.compile(r"^<\|reserved_special_token_(\d+)\|>$")
_logged: set[tuple[str, str]] = set()


def _ids(x: Any) -> list[int]:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return [int(i) for i in x if isinstance(i, int) and not isinstance(i, bool)]
    return [int(x)] if isinstance(x, int) and not isinstance(x, bool) else []


def model_eos_ids(model_dir: str | None) -> list[int]:
    """eos_token_id of generation_config.json then config.json in `model_dir` (lists kept whole)."""
    out: list[int] = []
    if not model_dir:
        return out
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    d = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"{path} is not readable JSON: {e}") from None
            out += [i for i in _ids(d.get("eos_token_id") if isinstance(d, dict) else None) if i not in out]
    return out


def eos_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The full EOS set of a tokenizer from `load_tokenizer` (else just its eos_token_id)."""
    ids = getattr(tokenizer, EOS_ATTR, None)
    if ids:
        return tuple(ids)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token")
    return (int(tokenizer.eos_token_id),)


def pick_pad_token(tokenizer: Any) -> str | None:
    """A reserved/pad special token of the vocabulary, or None (then EOS pads)."""
    vocab = tokenizer.get_vocab()
    for tok in PAD_CANDIDATES:
        if tok in vocab:
            return tok
    reserved = sorted((int(m.group(1)), t) for t in vocab if (m := _RESERVED.match(t)))
    return reserved[0][1] if reserved else None


def _log_once(name: str, msg: str) -> None:
    if (name, msg) not in _logged:
        _logged.add((name, msg))
        logging.info("tokenizer %s: %s", name, msg)


def prepare_special_tokens(tokenizer: Any, model_dirs: Iterable[str | None] = ()) -> Any:
    """Attach the EOS set and make sure a pad exists; returns the tokenizer (changed in place)."""
    name = str(getattr(tokenizer, "name_or_path", "") or "?")
    vocab_size = len(tokenizer.get_vocab())
    eos = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    for d in model_dirs:
        eos += [i for i in model_eos_ids(d) if i not in eos and 0 <= i < vocab_size]
    if not eos:
        raise ValueError(f"tokenizer at {name} has no EOS token (no eos_token in tokenizer_config.json and no "
                         "eos_token_id in config.json / generation_config.json): completions cannot end")
    if tokenizer.eos_token_id is None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos[0])
    setattr(tokenizer, EOS_ATTR, tuple(eos))
    setattr(tokenizer, AUTO_PAD_ATTR, None)
    if tokenizer.pad_token_id is None:
        pad = pick_pad_token(tokenizer) or tokenizer.convert_ids_to_tokens(eos[0])
        tokenizer.pad_token = pad
        setattr(tokenizer, AUTO_PAD_ATTR, pad)
        _log_once(name, f"no pad token; padding with {pad!r} (id {tokenizer.pad_token_id})"
                  + (", the EOS: masks mark the real tokens" if tokenizer.pad_token_id in eos else ""))
    if len(eos) > 1:
        _log_once(name, f"EOS ids {eos} ({tokenizer.convert_ids_to_tokens(eos)}): sampling stops on any")
    return tokenizer

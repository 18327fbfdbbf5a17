"""Train a tiny byte-level BPE tokenizer with a ChatML chat template.

Tests and the demo must not download anything, so they train their own
tokenizer in a second or two with the `tokenizers` library and wrap it in a
`transformers.PreTrainedTokenizerFast` that behaves like a Qwen tokenizer.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from gold_jax.data.special_tokens import AUTO_PAD_ATTR, prepare_special_tokens

ENDOFTEXT, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, PAD]

# Qwen-style ChatML; no default system prompt so prompts stay short in tests.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, *,
                    out_dir: str | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE over `texts`; eos = <|im_end|> (where an assistant turn stops)."""
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not a single str")
    min_size = 256 + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < min_size:
        raise ValueError(f"vocab_size must be an int >= {min_size} (256 bytes + specials), got {vocab_size!r}")
    texts = [t for t in texts]
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must contain only str")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD, unk_token=None, bos_token=None,
        extra_special_tokens=[ENDOFTEXT, IM_START], clean_up_tokenization_spaces=False,
        model_max_length=1 << 20, padding_side="left")
    hf.chat_template = CHATML_TEMPLATE
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        hf.save_pretrained(out_dir)
    return hf


def load_tokenizer(path: str, model_dir: str | None = None) -> PreTrainedTokenizerFast:
    """Load a tokenizer from a local directory only (never the hub).

    The EOS set (tokenizer + config.json / generation_config.json of `path` and
    `model_dir`) is attached and a missing pad is picked: see special_tokens.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"tokenizer path must be a str, got {type(path).__name__}")
    if not os.path.isdir(path):
        raise ValueError(f"tokenizer path {str(path)!r} does not exist or is not a directory "
                         "(only local tokenizers are supported; nothing is downloaded)")
    tok = AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    return prepare_special_tokens(tok, [os.fspath(path), model_dir])


# Loader arguments that transformers records in init_kwargs and would write back.
_LOADER_KEYS = ("is_local", "local_files_only", "_commit_hash", "cache_dir", "token", "revision")


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str) -> None:
    """save_pretrained without our loader arguments or an auto-picked pad in tokenizer_config.json.

    The exported folder then reads as the shipped one did: a pad we chose for
    training (special_tokens) is not presented as the model's own.
    """
    tokenizer.save_pretrained(out_dir)
    auto_pad = getattr(tokenizer, AUTO_PAD_ATTR, None)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(out_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            d = json.load(f)
        for k in _LOADER_KEYS:
            d.pop(k, None)
        pad = d.get("pad_token")
        if auto_pad is not None and (pad.get("content") if isinstance(pad, dict) else pad) == auto_pad:
            d.pop("pad_token")
        with open(path, "w") as f:
            json.dump(d, f, indent=2, ensure_ascii=False)
            f.write("\n")

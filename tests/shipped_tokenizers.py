"""Tokenizer folders shaped like the ones real models ship, built locally (nothing is downloaded).

- `llama3_dir`: byte-level BPE with Llama-3 special tokens appended after the
  regular vocabulary (<|begin_of_text|>, <|end_of_text|>, reserved tokens,
  <|eom_id|>, <|eot_id|> ...), a BOS post-processor, a Llama-3-style chat
  template, eos_token <|eot_id|> and NO pad token; config.json and
  generation_config.json carry the Llama 3.2 Instruct-style EOS list
  [<|end_of_text|>, <|eom_id|>, <|eot_id|>].
- `qwen_dir`: ChatML BPE with <|endoftext|>, <|im_start|>, <|im_end|>; the
  Instruct flavour stops on both <|im_end|> and <|endoftext|> (pad
  <|endoftext|>), the Base flavour has eos <|endoftext|>: same vocabulary,
  different EOS, like Qwen2.5 Base vs Instruct.

Usage: `from shipped_tokenizers import llama3_dir, qwen_dir` (tests/ is on sys.path).
"""
from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tiny_tokenizer import tiny_corpus

N_REGULAR = 300  # regular (BPE) ids; special tokens come after, as in Llama 3 and Qwen

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Qwen3-style: the template reads a kwarg (enable_thinking) passed to apply_chat_template.
QWEN_TEMPLATE = (
    "{% set no_think = enable_thinking is defined and enable_thinking is false %}"
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' and no_think %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{{ m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if no_think %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}")


def _bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=N_REGULAR, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    return tok


def llama3_specials(finetune_pad: bool) -> list[str]:
    """Llama 3.1's first special ids (128000...) in order; Llama 3.0 has a reserved token at 128004."""
    return ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>",
            "<|finetune_right_pad_id|>" if finetune_pad else "<|reserved_special_token_2|>",
            "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
            "<|eot_id|>", "<|python_tag|>", "<|reserved_special_token_4|>"]


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def build_llama3(out_dir: str, *, finetune_pad: bool = True, reserved: bool = True,
                 eos_list: bool = True) -> str:
    """A Llama-3.2-Instruct-shaped tokenizer folder without a pad token.

    reserved=False drops every reserved/pad-like special token, so only EOS can serve as pad.
    """
    tok = _bpe()
    specials = [s for s in llama3_specials(finetune_pad)
                if reserved or not ("reserved" in s or "pad" in s)]
    tok.add_special_tokens(specials)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                 clean_up_tokenization_spaces=True, model_max_length=131072)
    hf.chat_template = LLAMA3_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    ids = {s: tok.token_to_id(s) for s in specials}
    eos = ([ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]] if eos_list
           else ids["<|eot_id|>"])
    _write_json(os.path.join(out_dir, "generation_config.json"),
                {"bos_token_id": bos, "eos_token_id": eos, "do_sample": True, "temperature": 0.6, "top_p": 0.9})
    _write_json(os.path.join(out_dir, "config.json"), tiny_model_config("llama", tok.get_vocab_size(), bos, eos))
    return out_dir


def build_qwen(out_dir: str, *, instruct: bool = True) -> str:
    """Qwen2.5-shaped ChatML tokenizer folder; Instruct stops on <|im_end|> and <|endoftext|>."""
    tok = _bpe()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    eot, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>" if instruct else "<|endoftext|>",
                                 pad_token="<|endoftext|>", bos_token=None, unk_token=None,
                                 clean_up_tokenization_spaces=False, model_max_length=32768)
    hf.chat_template = QWEN_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    gen_eos = [im_end, eot] if instruct else eot
    _write_json(os.path.join(out_dir, "generation_config.json"),
                {"bos_token_id": eot, "eos_token_id": gen_eos, "pad_token_id": eot, "do_sample": True})
    _write_json(os.path.join(out_dir, "config.json"),
                tiny_model_config("qwen2", tok.get_vocab_size(), eot, im_end if instruct else eot))
    return out_dir


def tiny_model_config(arch: str, vocab: int, bos: int, eos) -> dict:
    """config.json of a tiny model over this vocabulary (no weights are written)."""
    return {"architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"], "model_type": arch,
            "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "bos_token_id": bos, "eos_token_id": eos}


def llama3_dir(tmp_path_factory, **kw) -> str:
    return build_llama3(str(tmp_path_factory.mktemp("llama3_tok")), **kw)


def qwen_dir(tmp_path_factory, **kw) -> str:
    return build_qwen(str(tmp_path_factory.mktemp("qwen_tok")), **kw)

"""Build (once) a teacher for the demo task that uses ANOTHER tokenizer (cross-tokenizer demo, issue 15).

The student stays the demo's own warmed-up student (byte-level BPE, Qwen
style, one token per digit or " digit"). Two teacher tokenizers (`variant`):

- "bytelevel": byte-level BPE like the student's (ByteLevel pre-tokenizer,
  "Ġ" spaces) with other merges and a larger vocabulary, trained on another
  corpus mix (the task's texts in reverse order plus its digit lists written
  without spaces) with the special tokens at the END of the vocabulary: every
  id differs, the common tokens are spelled the same. This is the regime of
  real cross-family pairs (Qwen2.5 <-> Llama 3).
- "sentencepiece": the hard case. A SentencePiece-style byte-fallback BPE, as
  a Llama-2-family model: its pre-tokenizer does not split at spaces
  (Metaspace "▁", split=False), so its merges span two digits ("▁3▁5"), and
  few token strings are shared with the student's.

Either teacher's model is trained on the demo's train split by the same SFT
code as the demo teacher until it solves the task.

Cached like the demo's assets (`demo.build`): a private temporary folder
renamed into place with a completion marker written last, a file lock, and a
spec key that includes the demo's own, so a rebuilt demo rebuilds this too.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import pyarrow.parquet as pq

from gold_jax.demo import build, task

CROSS_VERSION = 1
CROSS_VARIANTS = ("bytelevel", "sentencepiece")   # demo.cross_teacher's values (see the module docstring)
# Teacher tokenizer vocabulary cap per demo preset; "full" stops at 462 (the student's has 288).
CROSS_VOCAB = {"full": 1024, "tiny": 400}
# The byte-level variant's cap: larger than the student's 288 on the same task texts.
BYTELEVEL_VOCAB = {"full": 1024, "tiny": 600}
# Merges up to 5 characters ("▁4▁5", "0▁2"): two digits a token. Longer chunks ("1▁4▁4▁7") make the
# task much harder for a model of the demo teacher's size (loss still 3.1 after 350 steps at 1024 tokens).
MAX_TOKEN_CHARS = 5


@dataclasses.dataclass
class CrossAssets:
    root: str
    teacher_dir: str             # HF format + its own tokenizer files
    demo: build.DemoAssets       # student, data (unchanged)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # cross_assets.json


def train_teacher_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-fallback BPE over `texts` (SentencePiece style), ChatML specials and template like the student's.

    Spaces become "▁" inside one pre-token per line, so merges cross spaces;
    "\\n" stays its own pre-token so a prompt's last line never merges into
    the completion (the server tokenizes prompt + completion as one text).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from gold_jax.data.tokenizer import SPECIAL_TOKENS
    texts = list(texts)
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]   # any byte the student may write stays encodable
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + byte_tokens, show_progress=False,
        min_frequency=2, max_token_length=MAX_TOKEN_CHARS))
    return _wrap(tok)


def train_bytelevel_teacher_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE as the student's (GPT-2 pre-tokenizer, "Ġ" spaces) with other merges and ids.

    Trained on `texts` in reverse order plus their digit lists without spaces
    ("3 1 4" -> "314", whose merges the student never learns), with
    min_frequency=2, so the merge list and its ranks differ and the vocabulary
    is larger; the special tokens are added after training, at the end of the
    vocabulary (as Llama 3's are), so no token keeps the student's id.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from gold_jax.data.tokenizer import SPECIAL_TOKENS
    texts = list(texts)
    mix = list(reversed(texts)) + [t.replace(" ", "") if t[:1].isdigit() else t for t in texts]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(mix, trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(tok)


def _wrap(tok):
    """The HF fast tokenizer around a trained `tokenizers.Tokenizer`: the demo's specials and ChatML template."""
    from transformers import PreTrainedTokenizerFast

    from gold_jax.data.tokenizer import CHATML_TEMPLATE, ENDOFTEXT, IM_END, IM_START, PAD
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD, unk_token=None, bos_token=None,
        extra_special_tokens=[ENDOFTEXT, IM_START], clean_up_tokenization_spaces=False,
        model_max_length=1 << 20, padding_side="left")
    hf.chat_template = CHATML_TEMPLATE
    return hf


def _check_variant(variant: str) -> None:
    if variant not in CROSS_VARIANTS:
        raise ValueError(f"variant={variant!r}: the cross-tokenizer demo teacher is one of {CROSS_VARIANTS}")


def _root_name(preset: str, variant: str) -> str:
    """cross-<preset> for the SentencePiece variant (its first cache stays valid), else cross-<variant>-<preset>."""
    return f"cross-{preset}" if variant == "sentencepiece" else f"cross-{variant}-{preset}"


def _spec_key(preset: str, variant: str = "sentencepiece") -> dict[str, Any]:
    if variant == "bytelevel":
        return {"version": CROSS_VERSION, "variant": variant, "demo": build._spec_key(preset),
                "teacher_vocab": BYTELEVEL_VOCAB[preset]}
    return {"version": CROSS_VERSION, "demo": build._spec_key(preset), "teacher_vocab": CROSS_VOCAB[preset],
            "max_token_chars": MAX_TOKEN_CHARS}


def _is_complete(root: str, preset: str, variant: str) -> bool:
    try:
        with open(os.path.join(root, build.MARKER)) as f:
            return json.load(f) == _spec_key(preset, variant)
    except (OSError, ValueError):
        return False


def _assets(root: str, demo: build.DemoAssets) -> CrossAssets:
    with open(os.path.join(root, "cross_assets.json")) as f:
        info = json.load(f)
    return CrossAssets(root, os.path.join(root, "teacher"), demo, info)


def ensure_cross_assets(cache_dir: str, *, preset: str = "full", variant: str = "sentencepiece",
                        progress: bool = True) -> CrossAssets:
    """The cross-tokenizer teacher `variant` (CROSS_VARIANTS) under cache_dir + the demo's assets; built if needed."""
    _check_variant(variant)
    if preset not in CROSS_VOCAB:
        raise ValueError(f"preset={preset!r}: the cross-tokenizer teacher exists for the sorting task's presets "
                         f"{sorted(CROSS_VOCAB)}")
    demo = build.ensure_demo_assets(cache_dir, preset=preset, progress=progress)   # validates both arguments
    cache_dir = os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    name = _root_name(preset, variant)
    root = os.path.join(cache_dir, name)
    if _is_complete(root, preset, variant):
        return _assets(root, demo)
    with build._lock(os.path.join(cache_dir, f".{name}.lock")):
        if _is_complete(root, preset, variant):   # another process built it while we waited
            return _assets(root, demo)
        tmp = tempfile.mkdtemp(prefix=f".{name}.building-", dir=cache_dir)
        try:
            _build(tmp, preset, demo, variant=variant, progress=progress)
            if os.path.exists(root):
                build.log.warning("cross-tokenizer demo assets in %s are incomplete or stale: rebuilding", root)
                shutil.rmtree(root)
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _assets(root, demo)


def _rows(path: str) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def _build(out: str, preset: str, demo: build.DemoAssets, *, variant: str, progress: bool) -> None:
    from gold_jax.data.tokenizer import load_tokenizer
    from gold_jax.demo.evaluate import evaluate_accuracy
    from gold_jax.demo.sft import encode_rows, sft_train
    from gold_jax.models import hf_io, init_model

    p, t0, cpu0 = build.PRESETS[preset], time.perf_counter(), time.process_time()
    train, val, test = _rows(demo.train_file), _rows(demo.val_file), _rows(demo.eval_file)
    # Role names twice so that they merge (min_frequency=2) as the student's do.
    corpus = task.tokenizer_corpus(train + val) + ["user", "assistant"] * 2
    if variant == "bytelevel":
        tok = train_bytelevel_teacher_tokenizer(corpus, BYTELEVEL_VOCAB[preset])
    else:
        tok = train_teacher_tokenizer(corpus, CROSS_VOCAB[preset])
    student_tok = load_tokenizer(demo.student_dir)
    data = encode_rows(tok, train)
    t_tok = time.perf_counter() - t0

    teacher = init_model(build._model_config(p.teacher, tok), seed=0)
    steps, checks = 0, []
    for r in range(p.teacher_rounds):   # as the demo teacher: rounds at a lower rate until it solves the task
        steps += len(sft_train(teacher, data, steps=p.teacher_steps, batch_size=p.batch_size,
                               learning_rate=p.lr / (3 ** r), warmup_steps=p.warmup, seed=r, progress=progress,
                               desc=f"cross teacher sft (round {r + 1})"))
        if r + 1 == p.teacher_rounds:
            break
        acc = evaluate_accuracy(teacher, tok, val[:p.check_n])["accuracy"]
        checks.append((steps, acc))
        if acc >= p.teacher_target:
            break
    t_train = time.perf_counter() - t0 - t_tok
    acc = evaluate_accuracy(teacher, tok, test, progress=progress)

    d = os.path.join(out, "teacher")
    hf_io.save_pretrained(teacher, d)
    tok.save_pretrained(d)
    with open(os.path.join(d, "generation_config.json"), "w") as f:   # generate() stops at <|im_end|>
        json.dump({"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}, f, indent=2)

    def tokens_per_answer(t: Any) -> float:
        return sum(len(t(r["response"], add_special_tokens=False)["input_ids"]) for r in test) / len(test)
    shared = set(student_tok.get_vocab()) & set(tok.get_vocab())
    info = {
        "preset": preset, "variant": variant,
        "teacher": {"accuracy": acc["accuracy"], "well_formed": acc["well_formed"], "sft_steps": steps,
                    "params": build._n_params(teacher), "checks": checks, **dataclasses.asdict(p.teacher)},
        "student_accuracy": demo.info.get("student", {}).get("accuracy"),
        "tokenizers": {"student_vocab": len(student_tok), "teacher_vocab": len(tok),
                       "student_tokens_per_answer": round(tokens_per_answer(student_tok), 2),
                       "teacher_tokens_per_answer": round(tokens_per_answer(tok), 2),
                       "shared_strings": len(shared),
                       "shared_same_id": sum(student_tok.get_vocab()[k] == tok.get_vocab()[k] for k in shared)},
        "eval_n": len(test),
        "timings_s": {"tokenizer_s": round(t_tok, 2), "teacher_s": round(t_train, 2)},
        "build_s": round(time.perf_counter() - t0, 2), "build_cpu_s": round(time.process_time() - cpu0, 2),
        "load_avg_1min": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(),
    }
    with open(os.path.join(out, "cross_assets.json"), "w") as f:
        json.dump(info, f, indent=2)
    with open(os.path.join(out, build.MARKER), "w") as f:   # last: its presence means the build finished
        json.dump(_spec_key(preset, variant), f)
    if acc["accuracy"] < p.teacher_target:
        build.log.warning("cross-tokenizer teacher accuracy %.3f is below the target %.2f",
                          acc["accuracy"], p.teacher_target)
    msg = (f"cross-tokenizer teacher ({variant}, {preset}) built in {info['build_s']:.0f}s: "
           f"accuracy {acc['accuracy']:.3f} "
           f"on {len(test)} held-out prompts; vocab {len(tok)} vs the student's {len(student_tok)}")
    build.log.info(msg)
    if progress:
        build.tqdm.write(msg)


if __name__ == "__main__":   # python -m gold_jax.demo.cross_build [cache_dir] [preset] [variant]
    import sys
    a = ensure_cross_assets(sys.argv[1] if len(sys.argv) > 1 else "~/.cache/gold_jax/demo",
                            preset=sys.argv[2] if len(sys.argv) > 2 else "full",
                            variant=sys.argv[3] if len(sys.argv) > 3 else "sentencepiece")
    print(json.dumps(a.info, indent=2))


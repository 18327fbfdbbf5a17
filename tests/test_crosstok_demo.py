"""The cross-tokenizer demo (issue 15): configs/gold_cross.py and the teacher of another tokenizer.

The default tests check the config and the two tokenizers (trained here in a
second on a small slice of the task); the slow one builds the "tiny" cross
assets and resolves a demo run onto them.
"""
from __future__ import annotations

import pytest

from gold_jax import config as config_lib
from gold_jax.demo import task


def test_gold_cross_config_validates():
    from configs.gold import get_config as gold_config
    from configs.gold_cross import get_config
    for arg in (None, "runlocal", "uld", "runlocal,uld", "sentencepiece", "runlocal,sentencepiece,uld"):
        c = get_config(arg)
        config_lib.validate(c)
        assert c.gold.cross_tokenizer
        assert c.demo.cross_teacher == ("sentencepiece" if "sentencepiece" in (arg or "") else "bytelevel")
        assert c.gold.uld_use_hybrid_loss == ("uld" not in (arg or ""))
    # Everything but the teacher and the loss is the same-tokenizer demo's: equal-step comparisons hold.
    same, cross = gold_config(None), get_config(None)
    assert same.seed == cross.seed
    for key in ("trainer", "optimizer", "data", "rollout"):
        assert same[key].to_dict() == cross[key].to_dict(), key
    with pytest.raises(ValueError, match="unknown argument"):
        get_config("fast")


def test_cross_teacher_needs_cross_tokenizer():
    c = config_lib.base_config()
    c.demo.cross_teacher = "bytelevel"
    with pytest.raises(ValueError, match="demo.cross_teacher.*gold.cross_tokenizer"):
        config_lib.validate(c)
    c.gold.cross_tokenizer = True
    config_lib.validate(c)
    c.demo.cross_teacher = "llama"
    with pytest.raises(ValueError, match="demo.cross_teacher.*'bytelevel' or 'sentencepiece'"):
        config_lib.validate(c)


def test_unknown_cross_teacher_variant_fails_before_any_build(tmp_path):
    from gold_jax.demo.cross_build import ensure_cross_assets
    with pytest.raises(ValueError, match="variant='llama'.*bytelevel"):
        ensure_cross_assets(str(tmp_path), preset="tiny", variant="llama", progress=False)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def two_tokenizers():
    from gold_jax.data.tokenizer import train_tokenizer
    from gold_jax.demo.cross_build import train_teacher_tokenizer
    train, val = task.make_splits(400, 20, min_len=4, max_len=8, seed=0)
    corpus = task.tokenizer_corpus(train)
    return train_tokenizer(corpus, vocab_size=512), train_teacher_tokenizer(corpus + ["user", "assistant"] * 2,
                                                                             600), val, corpus


def test_bytelevel_teacher_tokenizer_differs_but_spells_the_task_alike(two_tokenizers):
    """The byte-level variant: other merges and ids, a larger vocabulary, the student's strings all shared."""
    import json

    from gold_jax.crosstok.align import align
    from gold_jax.demo.cross_build import train_bytelevel_teacher_tokenizer
    student, _, rows, corpus = two_tokenizers
    teacher = train_bytelevel_teacher_tokenizer(corpus + ["user", "assistant"] * 2, 600)
    sv, tv = student.get_vocab(), teacher.get_vocab()
    assert len(tv) > len(sv)
    assert set(sv) <= set(tv)                      # every student token string exists in the teacher's vocabulary
    assert all(sv[k] != tv[k] for k in sv)         # ... under another id
    s_merges, t_merges = (json.loads(t.backend_tokenizer.to_str())["model"]["merges"] for t in (student, teacher))
    assert len(t_merges) > len(s_merges) and t_merges[:len(s_merges)] != s_merges   # other merges, other ranks
    for row in rows:
        text = student.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        text += row["response"] + "<|im_end|>"
        sid = student(text, add_special_tokens=False)["input_ids"]
        tid = teacher(text, add_special_tokens=False)["input_ids"]
        assert teacher.decode(tid, skip_special_tokens=False) == text
        assert sid != tid and student.convert_ids_to_tokens(sid) == teacher.convert_ids_to_tokens(tid)
        al = align(student.backend_tokenizer, sid, teacher.backend_tokenizer, tid)
        assert al.unaligned_frac == 0.0
        assert all(s1 - s0 == 1 and t1 - t0 == 1 for s0, s1, t0, t1, _, _ in al.spans)


def test_cross_tokenizers_differ_and_both_redecode_the_task(two_tokenizers):
    from gold_jax.crosstok.align import align
    student, teacher, rows, _ = two_tokenizers
    assert len(teacher) > len(student)
    assert teacher.backend_tokenizer.pre_tokenizer.__class__ is not student.backend_tokenizer.pre_tokenizer.__class__
    longer = 0
    for row in rows:
        prompt = student.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        text = prompt + row["response"] + "<|im_end|>"
        sid = student(text, add_special_tokens=False)["input_ids"]
        tid = teacher(text, add_special_tokens=False)["input_ids"]
        for tok, ids in ((student, sid), (teacher, tid)):
            assert tok.decode(ids, skip_special_tokens=False) == text
        # Same chat template and end-of-turn marker on both sides (the teacher is trained on its own rendering).
        assert teacher.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False) == prompt
        assert teacher.eos_token == student.eos_token == "<|im_end|>"
        assert teacher.convert_ids_to_tokens(tid) != student.convert_ids_to_tokens(sid)
        s_ans = student(row["response"], add_special_tokens=False)["input_ids"]
        t_ans = teacher(row["response"], add_special_tokens=False)["input_ids"]
        longer += len(s_ans) > len(t_ans)   # the teacher's merges span several digits
        al = align(student.backend_tokenizer, sid, teacher.backend_tokenizer, tid)
        assert al.unaligned_frac == 0.0
        assert any(t1 - t0 == 1 and s1 - s0 > 1 for s0, s1, t0, t1, _, _ in al.spans)
    assert longer == len(rows)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sentencepiece", "bytelevel"])
def test_tiny_cross_assets_build_and_resolve(tmp_path, variant):
    """ensure_cross_assets builds once (marker, reuse), and a demo run with demo.cross_teacher gets that teacher."""
    import json
    import os

    from gold_jax import components
    from gold_jax.demo.cross_build import ensure_cross_assets
    from gold_jax.models.hf_io import load_pretrained
    a = ensure_cross_assets(str(tmp_path), preset="tiny", variant=variant, progress=False)
    assert a.info["variant"] == variant
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(a.teacher_dir, name))
    assert load_pretrained(a.teacher_dir).config.vocab_size == a.info["tokenizers"]["teacher_vocab"]
    assert a.info["tokenizers"]["teacher_vocab"] > a.info["tokenizers"]["student_vocab"]
    marker = os.path.join(a.root, "COMPLETE.json")
    mtime = os.path.getmtime(marker)
    assert ensure_cross_assets(str(tmp_path), preset="tiny", variant=variant, progress=False).info == a.info
    assert os.path.getmtime(marker) == mtime   # cached: not rebuilt
    with open(marker) as f:
        assert json.load(f)["demo"]["preset"] == "tiny"
    from configs.gold_cross import get_config
    cfg = get_config("runlocal" + (",sentencepiece" if variant == "sentencepiece" else ""))
    cfg.demo.cache_dir, cfg.demo.preset = str(tmp_path), "tiny"
    demo = components.resolve_demo(cfg)
    assert cfg.model.teacher_path == a.teacher_dir and cfg.model.student_path == demo.student_dir
    assert demo.info["teacher"] == a.info["teacher"]

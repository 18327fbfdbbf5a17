"""The chain task (issue 18): generator, both completion styles, scorer, the demo.task key."""
from __future__ import annotations

import json
import os
import re

import pytest

from gold_jax import config as config_lib
from gold_jax.demo import build, chain_task as ct, evaluate, task as sort_task


@pytest.fixture(scope="module")
def splits():
    return ct.make_splits(300, 50, min_len=8, max_len=10, seed=0)


def _check_steps(row, key, operand_first):
    """Every step of a completion is correct arithmetic on the previous value with the prompt's operation."""
    start, ops = ct.parse_prompt(row["prompt"][0]["content"])
    steps = re.findall(r"([a-z])=([0-9])([+*])([0-9])=([0-9])", row[key])
    assert len(steps) == len(ops)
    prev = start
    for i, ((letter, x, kind, k, y), op) in enumerate(zip(steps, ops)):
        assert letter == "abcdefghijklmnopqrstuvwxyz"[i + 1]
        if operand_first:        # style B: b=3*7=1
            x, k = k, x
        assert (kind, int(k)) == op and int(x) == prev
        expected = (prev + int(k)) % 10 if kind == "+" else (prev * int(k)) % 10   # independent of ct.apply
        assert int(y) == expected
        prev = expected
    return prev


def test_both_styles_are_correct_and_end_in_the_same_answer(splits):
    train, val = splits
    for row in train[:100] + val:
        final = _check_steps(row, "response", operand_first=True)
        assert _check_steps(row, ct.TEACHER_STYLE_KEY, operand_first=False) == final
        assert row["reward_model"]["ground_truth"] == str(final)
        a, b = row[ct.TEACHER_STYLE_KEY], row["response"]
        assert a != b and len(a) == len(b) and ct.extract_answer(a) == ct.extract_answer(b) == str(final)
        assert ct.score_completion(row, a) and ct.score_completion(row, b)
        assert ct.score_completion(row, b + "<|im_end|>junk")


def test_scorer_checks_the_final_answer_only():
    row = ct.make_row(7, [("*", 3), ("+", 4)], "test", 0)   # 7 -> 1 -> 5
    assert row[ct.TEACHER_STYLE_KEY] == "b=7*3=1 c=1+4=5 ans 5" and row["response"] == "b=3*7=1 c=4+1=5 ans 5"
    assert ct.score_completion(row, "b=2 c=9 ans 5")          # a wrong scratchpad, the right answer
    assert not ct.score_completion(row, "b=1 c=5 ans 4")
    assert not ct.score_completion(row, "b=1 c=5")            # no answer
    assert not ct.score_completion(row, "b=1 c=5 ans 5 d=3")  # the answer must end the completion
    assert ct.extract_answer("  ans 3  ") == "3" and ct.extract_answer("plans 3") is None
    assert ct.is_well_formed("b=1 ans 0") and not ct.is_well_formed("b=1 c=")


def test_every_error_changes_the_answer():
    """Operations are bijections of Z/10: one wrong intermediate value always changes the final answer."""
    ops = [("+", k) for k in ct.ADD_KS] + [("*", k) for k in ct.MUL_KS]
    for op in ops:
        assert sorted(ct.apply(op, x) for x in range(10)) == list(range(10))


def test_splits_are_disjoint_and_lengths_as_asked(splits):
    train, val = splits
    key = lambda r: r["prompt"][0]["content"]   # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in val}
    assert all(8 <= len(ct.parse_prompt(key(r))[1]) <= 10 for r in train + val)
    assert len(train) == 300 and len(val) == 50


@pytest.mark.parametrize("bad", [dict(min_len=0), dict(max_len=ct.MAX_STEPS + 1), dict(n_train=-1)])
def test_bad_split_arguments(bad):
    kw = dict(n_train=10, n_val=2, min_len=3, max_len=4) | bad
    n_train, n_val = kw.pop("n_train"), kw.pop("n_val")
    with pytest.raises(ValueError):
        ct.make_splits(n_train, n_val, **kw)


def test_bad_programs_and_prompts():
    with pytest.raises(ValueError, match="operation"):
        ct.format_prompt(1, [("*", 2)])     # not a bijection
    with pytest.raises(ValueError, match="start"):
        ct.format_prompt(12, [("+", 1)])
    with pytest.raises(ValueError, match="not a chain prompt"):
        ct.parse_prompt("Sort: 1 2 3")


def test_evaluation_dispatches_on_the_task(splits):
    train, _ = splits
    sort_rows = sort_task.make_splits(4, 0, min_len=3, max_len=4)[0]
    assert evaluate.task_of(train[:3]) is ct and evaluate.task_of(sort_rows) is sort_task
    assert evaluate.default_max_new_tokens(train[:3]) == ct.MAX_NEW_TOKENS
    assert evaluate.default_max_new_tokens(sort_rows) == evaluate.MAX_NEW_TOKENS
    with pytest.raises(ValueError, match="mix"):
        evaluate.task_of(train[:2] + sort_rows)


def test_demo_task_key_is_validated():
    cfg = config_lib.base_config()
    assert cfg.demo.task == "sort"
    cfg.demo.task = "chains"
    with pytest.raises(ValueError, match=r"config\.demo\.task='chains'"):
        config_lib.validate(cfg)
    cfg.demo.task = "chain"
    config_lib.validate(cfg)


def test_preset_names_keep_the_sorting_presets():
    assert build.preset_name("full") == "full" and build.preset_name("tiny", "chain") == "chain-tiny"
    assert not isinstance(build.PRESETS["full"], build.ChainPreset)
    assert "task" not in build._spec_key("full")["spec"]       # sorting caches are not invalidated
    with pytest.raises(ValueError, match="task='count'"):
        build.preset_name("full", "count")


@pytest.mark.slow
def test_tiny_chain_build_and_two_step_run(tmp_path):
    """The chain-tiny assets (both columns, data lengths) and a 2-step demo run with demo.task=chain."""
    import pyarrow.parquet as pq
    from configs import gold
    from gold_jax.metrics import read_jsonl
    from gold_jax.trainer import Trainer
    assets = build.ensure_demo_assets(str(tmp_path / "demo"), preset="tiny", task="chain", progress=False)
    assert assets.root.endswith("chain-tiny") and assets.info["task"]["name"] == "chain"
    rows = pq.read_table(assets.train_file).to_pylist()
    assert all(ct.score_completion(r, r["response"]) and ct.score_completion(r, r[ct.TEACHER_STYLE_KEY])
               for r in rows)
    c = gold.get_config("runlocal")
    c.run_dir, c.demo.cache_dir, c.demo.preset, c.demo.eval_n = str(tmp_path / "run"), str(tmp_path / "demo"), "tiny", 8
    c.demo.task = "chain"
    c.trainer.max_steps, c.trainer.eval_every, c.checkpoint.enabled = 2, 0, False
    c.trainer.progress_bar = c.trainer.tensorboard = False
    Trainer(c).run()
    saved = json.load(open(tmp_path / "run" / "config.json"))
    p = build.PRESETS["chain-tiny"]
    assert (saved["data"]["max_prompt_length"], saved["data"]["max_response_length"]) == \
        (p.max_prompt_length, p.max_response_length)
    evals = read_jsonl(os.path.join(tmp_path, "run", "metrics.jsonl"), kind="eval")
    assert [e["step"] for e in evals] == [0, 2] and all(0 <= e["eval/accuracy"] <= 1 for e in evals)


def test_a_pruned_student_preset_must_keep_the_teachers_shape(tmp_path, monkeypatch):
    """The chain student is carved from the teacher: a preset giving it another width fails before any build."""
    import dataclasses
    bad = dataclasses.replace(build.PRESETS["chain-tiny"],
                              student=dataclasses.replace(build.PRESETS["chain-tiny"].student, hidden=16))
    monkeypatch.setitem(build.PRESETS, "chain-tiny", bad)
    with pytest.raises(ValueError, match=r"pruned student keeps the teacher's \('hidden'"):
        build.ensure_demo_assets(str(tmp_path), preset="tiny", task="chain", progress=False)
    assert not (tmp_path / "chain-tiny").exists()

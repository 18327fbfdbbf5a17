"""`gold_jax.eval --run DIR`: a demo run is scored by exact-match accuracy, any other run by its
validation JSD on its own data.val_files (checked against a float64 NumPy reference), or refused."""
from __future__ import annotations

import os

import numpy as np
import pytest

import run_builder
from jsd_reference import ref_dense
from tiny_tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("eval_run"))
    tok = tiny_tokenizer()
    train, val = run_builder.demo_task_files(root)
    return dict(root=root, student=run_builder.tiny_model_dir(root, "student", tok, hidden=32, layers=1, seed=1),
                teacher=run_builder.tiny_model_dir(root, "teacher", tok, hidden=48, layers=2, seed=2),
                train=train, val=val, no_demo=os.path.join(root, "no_demo_cache"))


def _real_run(assets, name, **over):
    kw = {"model.student_path": assets["student"], "model.teacher_path": assets["teacher"],
          "data.train_files": assets["train"], "data.val_files": assets["val"],
          "demo.cache_dir": assets["no_demo"], **over}
    cfg = run_builder.tiny_config(os.path.join(assets["root"], name), **kw)
    return cfg, run_builder.make_run(cfg, step=2, noise=0.02)


def _reference_jsd(cfg, run_dir):
    """Mean dense JSD over the completion tokens of the run's first eval_batches validation batches,
    from the two models' float32 logits, in float64 (no loss code, no teacher server)."""
    from gold_jax import components
    from gold_jax.batches import seq_from_data
    from gold_jax.data.pipeline import iterate
    from gold_jax.export import load_student
    from gold_jax.fingerprint import tokenizer_size
    from gold_jax.models.hf_io import load_pretrained
    student, tok, _ = load_student(run_dir)
    teacher = load_pretrained(cfg.model.teacher_path)
    total = count = 0.0
    for _, b in zip(range(cfg.trainer.eval_batches), iterate(components.make_data(cfg, tok, "val"), cfg.data)):
        seq = seq_from_data(b)
        ids, attn, cm = (np.asarray(x) for x in (seq.input_ids, seq.attention_mask, seq.completion_mask))
        p, r = ids.shape[1] - cm.shape[1], cm.shape[1]
        s = np.asarray(student(ids, attn))[:, p - 1:p + r - 1]
        t = np.asarray(teacher(ids, attn))[:, p - 1:p + r - 1]
        per_tok = ref_dense(s, t, cfg.gold.beta, cfg.gold.temperature, tokenizer_size(tok))
        total, count = total + float((per_tok * cm).sum()), count + float(cm.sum())
    return total / count, int(count)


@pytest.mark.slow   # 35 s on the full demo assets
def test_real_model_run_is_scored_by_validation_jsd(assets):
    from gold_jax import eval as eval_cli
    cfg, run = _real_run(assets, "dense", **{"gold.top_k": 0})   # full teacher rows: the dense JSD
    res = eval_cli.evaluate(run=run, progress=False)
    assert "accuracy" not in res and res["eval_file"] == assets["val"]
    ref, n_tok = _reference_jsd(cfg, run)
    assert res["tokens"] == n_tok and res["n"] == cfg.trainer.eval_batches * cfg.trainer.global_batch_size
    assert ref > 1e-3
    np.testing.assert_allclose(res["eval/jsd_loss"], ref, rtol=2e-4)
    assert not os.path.exists(assets["no_demo"]), "a real-model run must not build the demo assets"


def test_student_equal_to_teacher_scores_zero_top_k(assets):
    """The default top-k path (tail bucket): a run whose student is its teacher has a zero JSD."""
    from gold_jax import eval as eval_cli
    cfg = run_builder.tiny_config(os.path.join(assets["root"], "same"), **{
        "model.student_path": assets["teacher"], "model.teacher_path": assets["teacher"],
        "data.train_files": assets["train"], "data.val_files": assets["val"], "demo.cache_dir": assets["no_demo"]})
    run = run_builder.make_run(cfg, step=1)
    res = eval_cli.evaluate(run=run, progress=False, n=8)   # one batch
    assert res["n"] == 8 and res["tokens"] > 0
    assert abs(res["eval/jsd_loss"]) < 1e-5, res


def test_real_model_run_without_val_files_is_refused(assets):
    from gold_jax import cli_errors
    from gold_jax import eval as eval_cli
    cfg = run_builder.tiny_config(os.path.join(assets["root"], "no_val"), **{
        "model.student_path": assets["student"], "model.teacher_path": assets["teacher"],
        "data.train_files": assets["train"], "data.val_files": "", "demo.cache_dir": assets["no_demo"]})
    from gold_jax import components
    components.write_config(cfg, cfg.run_dir)   # no checkpoint needed: refused before any model loads
    with pytest.raises(cli_errors.UserError, match=r"config\.data\.val_files is empty"):
        eval_cli.evaluate(run=cfg.run_dir, progress=False)
    with pytest.raises(FileNotFoundError, match="no_such_val"):
        eval_cli.evaluate(run=cfg.run_dir, data=os.path.join(assets["root"], "no_such_val.parquet"))
    assert not os.path.exists(assets["no_demo"])


def test_demo_run_is_scored_by_accuracy_as_before(tmp_path_factory):
    from gold_jax import eval as eval_cli
    from gold_jax.demo.build import ensure_demo_assets
    from gold_jax.demo.evaluate import evaluate_accuracy
    from gold_jax.export import load_student
    cache = str(tmp_path_factory.mktemp("demo_cache"))
    demo = ensure_demo_assets(cache, preset="tiny", progress=False)
    # As components.resolve_demo leaves a demo run's saved config: the demo's paths filled in.
    cfg = run_builder.tiny_config(str(tmp_path_factory.mktemp("demo_run")), **{
        "demo.cache_dir": cache, "demo.preset": "tiny", "model.student_path": demo.student_dir,
        "model.teacher_path": demo.teacher_dir, "data.train_files": demo.train_file,
        "data.val_files": demo.val_file})
    run = run_builder.make_run(cfg, step=1, noise=0.01)
    assert eval_cli.is_demo_run(cfg)
    res = eval_cli.evaluate(run=run, n=8, progress=False)
    assert res["eval_file"] == demo.eval_file and res["n"] == 8 and "eval/jsd_loss" not in res
    net, tok, _ = load_student(run)
    import pyarrow.parquet as pq
    ref = evaluate_accuracy(net, tok, pq.read_table(demo.eval_file).to_pylist()[:8], progress=False)
    assert res["accuracy"] == ref["accuracy"] and res["well_formed"] == ref["well_formed"]

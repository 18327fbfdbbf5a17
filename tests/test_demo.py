"""The embedded demo's assets, plot and eval CLI, on the "tiny" preset (seconds, not minutes).

The real figures (teacher >= 90%, student well below) come from the "full"
preset and are reported by the build in assets.json, not asserted here.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from gold_jax.demo import build, task
from gold_jax.demo.build import ensure_demo_assets


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_demo_assets(str(tmp_path_factory.mktemp("demo_cache")), preset="tiny", progress=False)


def test_tiny_assets_exist_and_load(tiny):
    from transformers import AutoTokenizer

    from gold_jax.models.hf_io import load_pretrained
    for path in (tiny.train_file, tiny.val_file, tiny.eval_file, os.path.join(tiny.root, "assets.json")):
        assert os.path.isfile(path), path
    tok = None
    for d in (tiny.teacher_dir, tiny.student_dir):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json"):
            assert os.path.isfile(os.path.join(d, name)), (d, name)
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
        assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
        text = tok.apply_chat_template([{"role": "user", "content": "Sort: 3 1"}], tokenize=False,
                                       add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n")
        model = load_pretrained(d)
        assert model.config.vocab_size >= len(tok)
    assert 0 < tiny.info["student"]["params"] < tiny.info["teacher"]["params"]


def test_teacher_loads_in_jax_teacher_backend(tiny):
    from gold_jax.teacher.backends.jax_backend import JaxBackend
    backend = JaxBackend.from_pretrained(tiny.teacher_dir)
    assert backend.info()["vocab_size"] == tiny.info["vocab_size"]


def test_data_files_are_verl_format_and_disjoint(tiny):
    splits = {name: pq.read_table(p).to_pylist() for name, p in
              (("train", tiny.train_file), ("val", tiny.val_file), ("eval", tiny.eval_file))}
    p = build.PRESETS["tiny"]
    assert [len(splits[s]) for s in ("train", "val", "eval")] == [p.n_train, p.n_val, p.n_eval]
    for rows in splits.values():
        for row in rows[:5]:
            assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].startswith("Sort:")
            assert task.score_completion(row, row["response"])
            assert row["reward_model"]["ground_truth"] == row["response"]
    prompts = {k: {r["prompt"][0]["content"] for r in v} for k, v in splits.items()}
    assert not prompts["eval"] & prompts["train"] and not prompts["eval"] & prompts["val"]
    assert not prompts["train"] & prompts["val"]


def test_assets_json_accuracies(tiny):
    with open(os.path.join(tiny.root, "assets.json")) as f:
        info = json.load(f)
    for who in ("teacher", "student"):
        acc = info[who]["accuracy"]
        assert isinstance(acc, float) and 0.0 <= acc <= 1.0, (who, acc)
        assert info[who]["params"] > 0
    assert info["preset"] == "tiny" and info["eval_n"] == build.PRESETS["tiny"].n_eval


def test_cached_assets_are_reused_and_incomplete_ones_rebuilt(tiny, monkeypatch):
    cache = os.path.dirname(tiny.root)
    stamp = os.path.getmtime(os.path.join(tiny.root, "assets.json"))
    calls = []
    real_build = build._build
    monkeypatch.setattr(build, "_build", lambda *a, **k: calls.append(1) or real_build(*a, **k))
    again = ensure_demo_assets(cache, preset="tiny", progress=False)
    assert again.root == tiny.root and calls == []
    assert os.path.getmtime(os.path.join(tiny.root, "assets.json")) == stamp
    # A crash mid-build leaves no marker: the next call must rebuild, not use half-written files.
    fake = os.path.join(cache, "crashed")
    os.makedirs(os.path.join(fake, "tiny"))
    open(os.path.join(fake, "tiny", "assets.json"), "w").write("{}")
    monkeypatch.setattr(build, "_build", lambda out, preset, progress: calls.append(out) or
                        (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        ensure_demo_assets(fake, preset="tiny", progress=False)
    assert len(calls) == 1
    assert not any(n.startswith(".tiny.building-") for n in os.listdir(fake))  # temp folder cleaned


def test_bad_preset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="preset='huge'"):
        ensure_demo_assets(str(tmp_path), preset="huge")


def test_plot_run_writes_png(tmp_path):
    from gold_jax.demo.plot import plot_run
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(1, 31):
            rec = {"step": s, "kind": "train", "actor/jsd_loss": 1.0 / s, "actor/lr": 1e-4}
            f.write(json.dumps(rec) + "\n")
        for s, a in ((0, 0.2), (15, 0.5), (30, 0.8)):
            f.write(json.dumps({"step": s, "kind": "eval", "eval/accuracy": a}) + "\n")
    out = plot_run(str(tmp_path))
    assert out == str(tmp_path / "metrics.png")
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out) > 5000


def test_plot_marks_on_and_off_policy_steps_and_the_teacher_line(tmp_path):
    """Issue 18: the loss panel colours each step by its batch's source; the accuracy panel has the teacher."""
    import matplotlib.pyplot as plt

    from gold_jax.demo.plot import OFF_COLOR, ON_COLOR, figure
    flags = [1.0 if s % 3 == 0 else 0.0 for s in range(1, 31)]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s, flag in zip(range(1, 31), flags):
            f.write(json.dumps({"step": s, "kind": "train", "actor/jsd_loss": 1.0 / s,
                                "gold/is_on_policy": flag}) + "\n")
        for s, a in ((0, 0.2), (15, 0.5), (30, 0.8)):
            f.write(json.dumps({"step": s, "kind": "eval", "eval/accuracy": a}) + "\n")
    fig = figure(str(tmp_path), teacher_accuracy=0.97)
    try:
        loss_ax, acc_ax = fig.axes
        points = {c.get_label(): c for c in loss_ax.collections}
        on = points["on-policy step (student samples)"]
        off = points["off-policy step"]
        assert sorted(on.get_offsets()[:, 0]) == [s for s, f in zip(range(1, 31), flags) if f == 1.0]
        assert sorted(off.get_offsets()[:, 0]) == [s for s, f in zip(range(1, 31), flags) if f == 0.0]
        np.testing.assert_allclose(on.get_offsets()[:, 1], 1.0 / on.get_offsets()[:, 0])
        from matplotlib.colors import to_rgba
        assert tuple(on.get_facecolor()[0]) == to_rgba(ON_COLOR)
        assert tuple(off.get_facecolor()[0]) == to_rgba(OFF_COLOR)
        assert "on-policy step (student samples)" in [t.get_text() for t in loss_ax.get_legend().get_texts()]
        teacher = [ln for ln in acc_ax.get_lines() if ln.get_label().startswith("teacher")]
        assert len(teacher) == 1 and list(teacher[0].get_ydata()) == [0.97, 0.97]
        assert teacher[0].get_label() == "teacher (0.970)"
        assert [t.get_text() for t in acc_ax.get_legend().get_texts()] == ["student", "teacher (0.970)"]
    finally:
        plt.close(fig)
    # Without a teacher accuracy or on-policy flags (older runs): no line, no markers, still a figure.
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "kind": "train", "actor/jsd_loss": 1.0}) + "\n" for s in (1, 2)))
    fig = figure(str(tmp_path))
    try:
        assert not fig.axes[0].collections
        assert not [ln for ln in fig.axes[1].get_lines() if ln.get_label().startswith("teacher")]
    finally:
        plt.close(fig)


def test_plot_run_without_metrics_is_a_clear_error(tmp_path):
    from gold_jax.demo.plot import plot_run
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "kind": "train", "x": 1}) + "\n")
    with pytest.raises(ValueError, match="actor/jsd_loss"):
        plot_run(str(tmp_path))


def test_eval_cli_on_tiny_teacher(tiny, capsys):
    from gold_jax import eval as eval_cli
    res = eval_cli.main(["--model", tiny.teacher_dir, "--cache_dir", os.path.dirname(tiny.root),
                         "--preset", "tiny", "--json"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["n"] == build.PRESETS["tiny"].n_eval and printed["eval_file"] == tiny.eval_file
    assert 0.0 <= res["accuracy"] <= 1.0 and 0.0 <= res["well_formed"] <= 1.0
    # The same model and prompts through the library function give the same figure.
    from gold_jax.data import load_tokenizer
    from gold_jax.demo.evaluate import evaluate_accuracy
    from gold_jax.models.hf_io import load_pretrained
    rows = pq.read_table(tiny.eval_file).to_pylist()
    ref = evaluate_accuracy(load_pretrained(tiny.teacher_dir), load_tokenizer(tiny.teacher_dir), rows)
    assert np.isclose(ref["accuracy"], res["accuracy"])


def test_eval_cli_argument_errors(tiny):
    from gold_jax import eval as eval_cli
    with pytest.raises(SystemExit):
        eval_cli.main(["--n", "5"])  # neither --run nor --model
    with pytest.raises(FileNotFoundError, match="does not exist"):
        eval_cli.evaluate(model=os.path.join(tiny.root, "nope"), data=tiny.eval_file)
    with pytest.raises(ValueError, match="--step applies to --run"):
        eval_cli.evaluate(model=tiny.teacher_dir, step=3, data=tiny.eval_file)


def test_eval_cli_run_uses_the_runs_demo_config(tiny, tmp_path, monkeypatch):
    """--run: the student comes from export.load_student, the eval file from the run's own config."""
    import ml_collections

    from gold_jax import eval as eval_cli
    from gold_jax import export
    from gold_jax.data import load_tokenizer
    from gold_jax.models.hf_io import load_pretrained
    cfg = ml_collections.ConfigDict({"demo": {"cache_dir": os.path.dirname(tiny.root), "preset": "tiny"}})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))   # eval reads it: demo or real-model run
    seen = []

    def fake_load_student(run_dir, step=None):
        seen.append((run_dir, step))
        return load_pretrained(tiny.student_dir), load_tokenizer(tiny.student_dir), cfg
    monkeypatch.setattr(export, "load_student", fake_load_student)
    res = eval_cli.main(["--run", str(tmp_path), "--step", "7"])
    assert seen == [(str(tmp_path), 7)]
    assert res["eval_file"] == tiny.eval_file and res["n"] == build.PRESETS["tiny"].n_eval
    assert "step 7" in res["source"]

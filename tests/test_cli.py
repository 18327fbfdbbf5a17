"""The command-line tools report a user's mistake as one line, `error: <message>`, with exit status 2.

Every case must fail before any model loads (config.validate checks paths), so the
subprocesses cost their imports only; they run a few at a time.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from gold_jax import cli_errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ the module itself (in-process)
def test_expected_and_unexpected_errors_are_told_apart():
    for exc in (ValueError("config.gold.beta=2: must be in [0, 1]"), FileNotFoundError("no such file"),
                NotADirectoryError("x"), PermissionError("x"), cli_errors.UserError("x")):
        assert cli_errors.is_expected(exc), exc
    for exc in (TypeError("x"), AttributeError("x"), KeyError("x"), RuntimeError("XLA failed"),
                AssertionError(), ZeroDivisionError()):
        assert not cli_errors.is_expected(exc), exc
    jax_bug = type("ShapeError", (ValueError,), {"__module__": "jax._src.core"})("bad shape")
    assert not cli_errors.is_expected(jax_bug)   # a ValueError from inside jax is our bug


def test_message_is_one_clean_line():
    out = io.StringIO()
    assert cli_errors.report(FileNotFoundError(2, "No such file or directory", "/x/train.parquet"), out) == 2
    assert out.getvalue() == "error: No such file or directory: '/x/train.parquet'\n"
    assert cli_errors.message(cli_errors.UserError("")) == "UserError"


def test_run_exits_2_on_expected_error_and_reraises_otherwise(capsys, monkeypatch):
    monkeypatch.delenv(cli_errors.ENV_TRACEBACK, raising=False)

    def bad_value():
        raise ValueError("config.gold.beta=2.0: must be in [0, 1]")
    with pytest.raises(SystemExit) as e:
        cli_errors.run(bad_value)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: config.gold.beta=2.0: must be in [0, 1]\n"
    with pytest.raises(TypeError):   # a bug keeps its traceback
        cli_errors.run(lambda: None + 1)
    with pytest.raises(ValueError):  # asked for the traceback: the exception propagates
        cli_errors.run(bad_value, verbosity=1)
    monkeypatch.setenv(cli_errors.ENV_TRACEBACK, "1")
    with pytest.raises(ValueError):
        cli_errors.run(bad_value)
    assert cli_errors.run(lambda x: x + 1, 1) == 2


# ------------------------------------------------------------------ the CLIs (subprocesses)
@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny student/teacher, data files and a real-model run dir without val files (config.json only)."""
    sys.path.insert(0, os.path.dirname(__file__))
    import run_builder
    from tiny_tokenizer import tiny_tokenizer
    root = str(tmp_path_factory.mktemp("cli"))
    tok = tiny_tokenizer()
    student = run_builder.tiny_model_dir(root, "student", tok, hidden=32, layers=1, seed=1)
    teacher = run_builder.tiny_model_dir(root, "teacher", tok, hidden=32, layers=1, seed=2)
    train, val = run_builder.demo_task_files(root)
    no_val = os.path.join(root, "run_no_val")
    cfg = run_builder.tiny_config(no_val, **{"model.student_path": student, "model.teacher_path": teacher,
                                             "data.train_files": train, "data.val_files": ""})
    os.makedirs(no_val)
    with open(os.path.join(no_val, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f)
    done = run_builder.make_run(run_builder.tiny_config(os.path.join(root, "run_done"), **{
        "model.student_path": student, "model.teacher_path": teacher, "data.train_files": train,
        "data.val_files": val}), step=2)
    return dict(root=root, student=student, teacher=teacher, train=train, val=val, no_val=no_val, done=done)


def _train(d, *extra, **paths):
    p = {"student_path": d["student"], "teacher_path": d["teacher"], "train_files": d["train"], **paths}
    return ["-m", "gold_jax.train", "--config", "configs/tiny.py", f"--config.run_dir={d['root']}/run",
            f"--config.model.student_path={p['student_path']}", f"--config.model.teacher_path={p['teacher_path']}",
            f"--config.data.train_files={p['train_files']}", *extra]


def _cases(d):
    """name -> (argv after python, extra env)."""
    tb = {cli_errors.ENV_TRACEBACK: "1"}
    return {
        "bad_value": (_train(d, "--config.gold.beta=1.5"), {}),
        "bad_value_env_traceback": (_train(d, "--config.gold.beta=1.5"), tb),
        "bad_value_verbosity": (_train(d, "--config.gold.beta=1.5", "--verbosity=1"), {}),
        "unknown_key": (_train(d, "--config.gold.bta=0.1"), {}),
        "unparsable_value": (_train(d, "--config.gold.beta=abc"), {}),
        "missing_config_file": (["-m", "gold_jax.train", "--config", "configs/no_such_config.py"], {}),
        "missing_data_file": (_train(d, train_files=os.path.join(d["root"], "no_such.parquet")), {}),
        "missing_model_dir": (_train(d, student_path=os.path.join(d["root"], "no_such_model")), {}),
        "export_missing_run": (["-m", "gold_jax.export", "--run", os.path.join(d["root"], "no_run"),
                                "--out", os.path.join(d["root"], "hf")], {}),
        "export_bad_dtype": (["-m", "gold_jax.export", "--run", d["no_val"], "--out", os.path.join(d["root"], "hf"),
                              "--dtype=int8"], {}),
        "export_no_checkpoint": (["-m", "gold_jax.export", "--run", d["no_val"],
                                  "--out", os.path.join(d["root"], "hf")], {}),
        "export_missing_step": (["-m", "gold_jax.export", "--run", d["done"], "--step=7",
                                 "--out", os.path.join(d["root"], "hf")], {}),
        "eval_missing_run": (["-m", "gold_jax.eval", "--run", os.path.join(d["root"], "no_run")], {}),
        "eval_no_val_files": (["-m", "gold_jax.eval", "--run", d["no_val"]], {}),
        "bug": (["-c", "from gold_jax import cli_errors; cli_errors.run(lambda: None + 1)"], {}),
    }


@pytest.fixture(scope="module")
def results(dirs):
    env = {k: v for k, v in os.environ.items() if k != cli_errors.ENV_TRACEBACK}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")

    def one(item):
        name, (argv, extra) = item
        p = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={**env, **extra})
        return name, p
    with ThreadPoolExecutor(3) as pool:
        return dict(pool.map(one, _cases(dirs).items()))


def _one_error_line(p, *needles):
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert len(lines) == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("name,needles", [
    ("bad_value", ["config.gold.beta=1.5", "[0, 1]"]),
    ("unknown_key", ["bta", "beta"]),
    ("unparsable_value", ["--config.gold.beta", "abc"]),
    ("missing_config_file", ["configs/no_such_config.py"]),
    ("missing_data_file", ["no_such.parquet"]),
    ("missing_model_dir", ["no_such_model"]),
    ("export_missing_run", ["no_run", "does not exist"]),
    ("export_bad_dtype", ["--dtype", "int8"]),
    ("export_no_checkpoint", ["no checkpoint"]),
    ("export_missing_step", ["step 7", "steps: [2]"]),
    ("eval_missing_run", ["no_run", "does not exist"]),
    ("eval_no_val_files", ["data.val_files", "--data"]),
])
def test_expected_error_is_one_line_exit_2(results, dirs, name, needles):
    _one_error_line(results[name], *needles)
    assert not os.path.exists(os.path.join(dirs["root"], "run", "metrics.jsonl"))


@pytest.mark.parametrize("name", ["bad_value_env_traceback", "bad_value_verbosity"])
def test_traceback_on_request(results, name):
    p = results[name]
    assert p.returncode != 0
    assert "Traceback (most recent call last)" in p.stderr and "config.gold.beta=1.5" in p.stderr, p.stderr[-3000:]


def test_unexpected_error_keeps_its_traceback(results):
    p = results["bug"]
    assert p.returncode == 1
    assert "Traceback (most recent call last)" in p.stderr and "TypeError" in p.stderr
    assert not any(ln.startswith("error:") for ln in p.stderr.splitlines())

"""Config validation: light imports, one source for names, every late-crashing combination, paths, warmup.

The combination sweep covers loss.impl x gold.top_k x gold.topk_mode x mesh.tensor x
rollout.engine x teacher.backend: every rejected combination must name both keys, and
every accepted one must be computable by the loss table (checked on a tiny model).
"""
import itertools
import json
import os
import subprocess
import sys

import pytest
import run_builder

from gold_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("jax", "flax", "transformers", "torch", "grain")

IMPLS = config_lib.LOSS_IMPLS
TOP_KS = (0, 4)
MODES = ("tail", "renormalize")
TENSORS = (1, 2)
ENGINES = ("jax", "vllm")
BACKENDS = ("jax", "vllm")


def _model_dir(path, vocab=64, tokenizer=True):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"vocab_size": vocab}, f)
    if tokenizer:
        with open(os.path.join(path, "tokenizer.json"), "w") as f:
            f.write("{}")
    return str(path)


@pytest.fixture
def paths(tmp_path):
    """A real-run layout that passes the path checks: student, teacher, data, run dir."""
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "response": "b"}\n')
    return dict(student=_model_dir(tmp_path / "student"), teacher=_model_dir(tmp_path / "teacher", tokenizer=False),
                train=str(train), run=str(tmp_path / "runs" / "r"), root=tmp_path)


def _cfg(paths, **over):
    c = config_lib.base_config()
    c.run_dir = paths["run"]
    c.model.student_path, c.model.teacher_path = paths["student"], paths["teacher"]
    c.data.train_files = paths["train"]
    return run_builder.override(c, over)


def test_config_import_and_validate_load_no_heavy_module():
    code = ("import sys, gold_jax.config as c; c.validate(c.base_config()); "
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules]; assert not heavy, heavy")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def test_allowed_names_have_one_source():
    from gold_jax import names
    from gold_jax.losses import registry
    from gold_jax.data import default_data_config
    from gold_jax.losses import validation
    from gold_jax.models import config as model_config
    from gold_jax.rollout import ENGINES as rollout_engines
    from gold_jax.sharding.rules import BATCH_AXES, mesh_axes
    from gold_jax.teacher.backends import BACKENDS
    from gold_jax.train_step import BATCH_AXES as step_axes
    assert config_lib.LOSS_IMPLS == ("auto",) + tuple(registry.LOSSES)
    assert rollout_engines is names.ROLLOUT_ENGINES and BACKENDS is names.TEACHER_BACKENDS
    assert model_config.DTYPES is names.MODEL_DTYPES and config_lib.DTYPES == ("auto",) + names.MODEL_DTYPES
    assert validation.TOPK_MODES is names.TOPK_MODES and validation.REDUCTIONS is names.REDUCTIONS
    assert config_lib.SCHEDULERS is names.SCHEDULERS and set(names.STALENESS) == set(names.SCHEDULERS)
    assert step_axes is BATCH_AXES and BATCH_AXES == mesh_axes("batch") == ("data", "fsdp")
    assert config_lib.base_config().data.to_dict() == default_data_config().to_dict()
    assert not hasattr(config_lib, "_data_defaults")


def _combos():
    return itertools.product(IMPLS, TOP_KS, MODES, TENSORS, ENGINES, BACKENDS)


def _expected_rejection(impl, top_k):
    """The keys a rejection must name, from the table's declared needs (None: accepted)."""
    from gold_jax.losses import registry
    signal = registry.teacher_signal(top_k)
    if impl != "auto" and signal not in registry.LOSSES[impl].signals:
        return ("loss.impl", "gold.top_k")
    return None


def test_combination_sweep_rejects_with_both_keys_and_accepts_the_rest(paths, monkeypatch):
    monkeypatch.setattr("gold_jax.config_checks.has_package", lambda name: True)   # the sweep is about combinations
    from gold_jax.losses import registry
    accepted = rejected = 0
    for impl, top_k, mode, tensor, engine, backend in _combos():
        cfg = _cfg(paths, **{"loss.impl": impl, "gold.top_k": top_k, "gold.topk_mode": mode, "mesh.tensor": tensor,
                             "rollout.engine": engine, "teacher.backend": backend})
        keys = _expected_rejection(impl, top_k)
        if keys is None:
            config_lib.validate(cfg, 8)
            resolved = registry.resolve_impl(impl, registry.teacher_signal(top_k), tensor)
            assert registry.teacher_signal(top_k) in registry.LOSSES[resolved].signals
            accepted += 1
        else:
            with pytest.raises(ValueError) as e:
                config_lib.validate(cfg, 8)
            msg = str(e.value)
            assert all(f"config.{k}=" in msg for k in keys), (impl, top_k, msg)
            rejected += 1
    # dense/k>0, topk/k=0, and "uld" at every k (it needs gold.cross_tokenizer, issue 15)
    assert rejected == (2 + len(TOP_KS)) * len(MODES) * len(TENSORS) * len(ENGINES) * len(BACKENDS)
    assert accepted + rejected == len(list(_combos()))


def test_dense_loss_with_topk_teacher_fails_naming_both_keys(paths):
    """The shape error inside the loss ("student_logits ... and teacher_logits ... must have the same shape")."""
    with pytest.raises(ValueError, match=r"config\.loss\.impl='dense', config\.gold\.top_k=64"):
        config_lib.validate(_cfg(paths, **{"loss.impl": "dense"}))


@pytest.mark.parametrize("over,keys", [
    ({"gold.top_k": 0}, ("teacher.backend", "gold.top_k")),
    ({"gold.temperature": 0.9}, ("teacher.backend", "gold.temperature")),
])
def test_vllm_teacher_limits_fail_naming_both_keys(paths, monkeypatch, over, keys):
    monkeypatch.setattr("gold_jax.config_checks.has_package", lambda name: True)
    big = _model_dir(paths["root"] / "big_teacher", vocab=151936, tokenizer=False)
    cfg = _cfg(paths, **{"teacher.backend": "vllm", "model.teacher_path": big, "gold.temperature": 1.0, **over})
    with pytest.raises(ValueError) as e:
        config_lib.validate(cfg)
    assert all(f"config.{k}=" in str(e.value) for k in keys), str(e.value)
    cfg = _cfg(paths, **{"teacher.backend": "vllm", "gold.temperature": 1.0, **over})   # 64 ids: vLLM can
    config_lib.validate(cfg)


def test_vllm_without_the_package_fails_at_validation(paths, monkeypatch):
    monkeypatch.setattr("gold_jax.config_checks.has_package", lambda name: False)
    with pytest.raises(ValueError, match=r"config\.rollout\.engine='vllm'.*vllm package"):
        config_lib.validate(_cfg(paths, **{"rollout.engine": "vllm"}))
    with pytest.raises(ValueError, match=r"config\.teacher\.backend='vllm'.*vllm package"):
        config_lib.validate(_cfg(paths, **{"teacher.backend": "vllm"}))
    config_lib.validate(_cfg(paths, **{"teacher.backend": "vllm", "teacher.address": "tcp://127.0.0.1:1"}))


def test_every_path_is_checked_naming_the_key(paths):
    root = paths["root"]
    config_lib.validate(_cfg(paths))
    empty = root / "empty"
    empty.mkdir()
    no_tok = _model_dir(root / "no_tok", tokenizer=False)
    blocker = root / "a_file"
    blocker.write_text("x")
    cases = [
        ({"model.student_path": str(root / "missing")}, "model.student_path", "no such directory"),
        ({"model.student_path": str(empty)}, "model.student_path", "config.json"),
        ({"model.student_path": no_tok}, "model.student_path", "tokenizer"),
        ({"model.tokenizer_path": str(empty)}, "model.tokenizer_path", "tokenizer"),
        ({"model.teacher_path": str(empty)}, "model.teacher_path", "config.json"),
        ({"data.train_files": str(root / "nope.jsonl")}, "data.train_files", "does not exist"),
        ({"data.train_files": str(root / "*.parquet")}, "data.train_files", "does not exist"),
        ({"data.val_files": str(root / "val.jsonl")}, "data.val_files", "does not exist"),
        ({"run_dir": str(blocker)}, "run_dir", "not a directory"),
        ({"run_dir": str(blocker / "sub")}, "run_dir", "not a directory"),
        ({"teacher.cache_dir": str(blocker / "cache")}, "teacher.cache_dir", "not a directory"),
        ({"model.teacher_path": ""}, "model.teacher_path", "given together"),
    ]
    for over, key, needle in cases:
        with pytest.raises(ValueError) as e:
            config_lib.validate(_cfg(paths, **over))
        msg = str(e.value)
        assert f"config.{key}" in msg and needle in msg, (over, msg)
    # A tokenizer elsewhere rescues a model dir without one; a glob that matches is fine.
    config_lib.validate(_cfg(paths, **{"model.student_path": no_tok, "model.tokenizer_path": paths["student"],
                                       "data.train_files": str(root / "*.jsonl")}))
    if os.geteuid() != 0:
        ro = root / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(ValueError, match=r"config\.run_dir=.*not writable"):
            config_lib.validate(_cfg(paths, run_dir=str(ro / "run")))


def test_bad_data_path_fails_in_validate_within_a_second_of_process_start(paths):
    """The fail-fast path of the CLI: no model or heavy package is loaded before the message."""
    code = ("import sys, gold_jax.config as c\n"
            "cfg = c.base_config(); cfg.run_dir = sys.argv[1]\n"
            "cfg.model.student_path, cfg.model.teacher_path = sys.argv[2], sys.argv[3]\n"
            "cfg.data.train_files = sys.argv[4]\n"
            "try:\n    c.validate(cfg)\nexcept ValueError as e:\n    print(e)\n"
            f"assert not [m for m in {HEAVY!r} if m in sys.modules]\n")
    p = subprocess.run([sys.executable, "-c", code, paths["run"], paths["student"], paths["teacher"],
                        str(paths["root"] / "typo.parquet")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "config.data.train_files" in p.stdout and "typo.parquet" in p.stdout

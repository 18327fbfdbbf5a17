"""End-to-end GOLD runs on tiny models (levanter's "pulse" test): metrics, λ, schedulers, resume."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gold_jax import config as config_lib
from gold_jax.demo import task
from gold_jax.metrics import STEP_METRICS, read_jsonl
from gold_jax.models import ModelConfig, init_model
from gold_jax.models.hf_io import save_pretrained
from tiny_tokenizer import tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_dir(root, name, tok, hidden, layers, seed):
    cfg = ModelConfig(architecture="qwen3", vocab_size=len(tok.get_vocab()), hidden_size=hidden,
                      intermediate_size=2 * hidden, num_layers=layers, num_heads=2, num_kv_heads=1, head_dim=16,
                      qk_norm=True, max_position_embeddings=128, eos_token_id=tok.eos_token_id)
    path = os.path.join(root, name)
    save_pretrained(init_model(cfg, seed=seed), path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("assets"))
    tok = tiny_tokenizer()
    rng = np.random.default_rng(0)
    rows = [task.make_row(rng.integers(0, 10, 4), "train", i) for i in range(64)]
    train = os.path.join(root, "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows), train)
    val = os.path.join(root, "val.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:16]), val)
    return dict(student=_model_dir(root, "student", tok, 32, 1, 1), teacher=_model_dir(root, "teacher", tok, 48, 2, 2),
                train=train, val=val)


def make_cfg(assets, run_dir, **over):
    spec = os.path.join(REPO, "configs", "tiny.py")
    import importlib.util
    mod = importlib.util.spec_from_file_location("tiny_cfg", spec)
    m = importlib.util.module_from_spec(mod)
    mod.loader.exec_module(m)
    c = m.get_config()
    c.run_dir = str(run_dir)
    c.model.student_path, c.model.teacher_path = assets["student"], assets["teacher"]
    c.data.train_files, c.data.val_files = assets["train"], assets["val"]
    for k, v in over.items():
        node = c
        *head, last = k.split(".")
        for h in head:
            node = node[h]
        node[last] = v
    return c


def run(cfg):
    from gold_jax.trainer import Trainer
    return Trainer(cfg).run()


@pytest.fixture(scope="module")
def pulse(assets, tmp_path_factory):
    """One run of 6 steps, one_step_off, lmbda 0.5, on the default 8-device mesh."""
    run_dir = tmp_path_factory.mktemp("pulse")
    cfg = make_cfg(assets, run_dir, **{"trainer.max_steps": 6, "gold.lmbda": 0.5, "trainer.eval_every": 3,
                                       "trainer.log_completions_every": 2})
    run(cfg)
    return run_dir


def test_pulse_writes_every_metric_and_learns(pulse):
    recs = read_jsonl(os.path.join(pulse, "metrics.jsonl"))
    assert [r["step"] for r in recs] == list(range(1, 7))
    for r in recs:
        missing = [k for k in STEP_METRICS if k not in r]
        assert not missing, missing
        assert np.isfinite(r["actor/jsd_loss"]) and r["actor/jsd_loss"] > 0
    evals = read_jsonl(os.path.join(pulse, "metrics.jsonl"), kind="eval")
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert evals[-1]["eval/jsd_loss"] < evals[0]["eval/jsd_loss"]
    comps = [json.loads(x) for x in open(os.path.join(pulse, "completions.jsonl"))]
    assert comps and all(np.isfinite(c["teacher_nll"]) for c in comps)
    assert os.path.isdir(os.path.join(pulse, "checkpoints", "6"))


def test_export_loads_in_transformers(pulse, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from gold_jax.export import export, load_student
    out = export(str(pulse), str(tmp_path / "hf"))
    model, tok, _ = load_student(str(pulse))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    ids = np.asarray([tok("Sort: 3 1 2")["input_ids"]], np.int32)
    ours = np.asarray(model(ids, np.ones_like(ids)))
    theirs = hf(torch.as_tensor(ids, dtype=torch.long)).logits.detach().numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_bad_config_fails_naming_the_key(assets, tmp_path):
    for key, val, needle in [("gold.beta", 1.5, "gold.beta"), ("gold.lmbda", -0.1, "gold.lmbda"),
                             ("gold.temperature", 0.0, "gold.temperature"),
                             ("trainer.scheduler", "async", "trainer.scheduler")]:
        cfg = make_cfg(assets, tmp_path, **{key: val})
        with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
            config_lib.validate(cfg, 8)
    cfg = make_cfg(assets, tmp_path, **{"mesh.tensor": 3})
    with pytest.raises(ValueError, match="mesh"):
        config_lib.validate(cfg, 8)
    cfg = make_cfg(assets, tmp_path)
    with cfg.unlocked():
        cfg.gold.betta = 0.1
    with pytest.raises(ValueError, match="gold.betta"):
        config_lib.validate(cfg, 8)


def _losses(run_dir):
    last = {}
    for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        last[r["step"]] = r["actor/jsd_loss"]
    return [last[k] for k in sorted(last)]


@pytest.mark.slow
@pytest.mark.parametrize("lmbda", [0.0, 0.5, 1.0])
def test_on_policy_ratio_tracks_lmbda(assets, tmp_path, lmbda):
    cfg = make_cfg(assets, tmp_path, **{"trainer.max_steps": 40, "gold.lmbda": lmbda, "checkpoint.enabled": False,
                                        "trainer.scheduler": "sync", "data.max_response_length": 4})
    run(cfg)
    ratio = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))[-1]["gold/on_policy_ratio"]
    assert abs(ratio - lmbda) <= 0.2


@pytest.mark.slow
def test_schedulers_agree_when_off_policy(assets, tmp_path):
    out = {}
    for sched in ("sync", "one_step_off", "two_step_off"):
        cfg = make_cfg(assets, tmp_path / sched, **{"trainer.max_steps": 4, "gold.lmbda": 0.0,
                                                    "trainer.scheduler": sched, "checkpoint.enabled": False})
        run(cfg)
        out[sched] = _losses(tmp_path / sched)
    assert out["sync"] == out["one_step_off"] == out["two_step_off"]


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["sync", "one_step_off", "two_step_off"])
def test_resume_after_sigkill_is_bitwise(assets, tmp_path, scheduler):
    over = {"trainer.max_steps": 6, "gold.lmbda": 0.5, "trainer.scheduler": scheduler, "checkpoint.every": 2}
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    run(make_cfg(assets, ref_dir, **over))
    cfg = make_cfg(assets, kill_dir, **over)
    script = ("import sys, ml_collections, json; sys.path.insert(0, 'tests');"
              "from gold_jax.trainer import Trainer;"
              f"Trainer(ml_collections.ConfigDict(json.loads({json.dumps(cfg.to_json())!r}))).run()")
    env = dict(os.environ, GOLD_JAX_KILL_AT_STEP="3", PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-3000:]
    run(make_cfg(assets, kill_dir, **over))
    assert _losses(kill_dir) == _losses(ref_dir)

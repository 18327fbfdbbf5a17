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
                                       "trainer.log_completions_every": 2, "profile.start_step": 2,
                                       "profile.num_steps": 1})
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
    traces = [f for _, _, fs in os.walk(os.path.join(pulse, "profile")) for f in fs if ".xplane.pb" in f]
    assert traces, "no XLA profiler trace written"


def test_corrupt_checkpoint_is_a_clear_error(assets, pulse, tmp_path):
    import shutil
    from gold_jax.trainer import Trainer
    run_dir = tmp_path / "run"
    shutil.copytree(pulse, run_dir)
    step_dir = run_dir / "checkpoints" / "6" / "state"
    for root, _, files in os.walk(step_dir):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    cfg = make_cfg(assets, run_dir, **{"trainer.max_steps": 8})
    with pytest.raises(RuntimeError, match="checkpoint step 6"):
        Trainer(cfg)


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


def test_cli_rejects_bad_values_before_any_work(tmp_path):
    for flag, key in [("--config.gold.beta=1.5", "gold.beta"), ("--config.trainer.scheduler=async", "trainer.scheduler"),
                      ("--config.gold.bta=0.1", "'bta'")]:  # ml_collections: "'bta' ... Did you mean beta"
        p = subprocess.run([sys.executable, "-m", "gold_jax.train", "--config", "configs/tiny.py", flag,
                            f"--config.run_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and key in p.stderr, p.stderr[-2000:]
    assert not os.path.exists(os.path.join(tmp_path, "metrics.jsonl"))


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
    # Same batches in the same order: equal to float32 rounding (teacher batching may regroup requests).
    np.testing.assert_allclose(out["one_step_off"], out["sync"], rtol=1e-6)
    np.testing.assert_allclose(out["two_step_off"], out["sync"], rtol=1e-6)


@pytest.mark.slow
def test_one_step_off_equals_sync_fed_stale_weights(assets, tmp_path):
    from flax import nnx
    from gold_jax.trainer import Trainer

    class StaleSync(Trainer):
        """sync, but the engine gets θ_{t-1} before generating the batch for step t."""
        def _sync(self):
            cur, prev = self._copy(self.state.params), getattr(self, "_prev", None)
            if prev is not None:
                self.engine.sync_weights(nnx.merge(self.graphdef, prev))
            self._prev = cur
            return 0.0

    over = {"trainer.max_steps": 4, "gold.lmbda": 1.0, "checkpoint.enabled": False, "optimizer.lr": 3e-2}
    Trainer(make_cfg(assets, tmp_path / "off", **over, **{"trainer.scheduler": "one_step_off"})).run()
    StaleSync(make_cfg(assets, tmp_path / "ref", **over, **{"trainer.scheduler": "sync"})).run()
    Trainer(make_cfg(assets, tmp_path / "sync", **over, **{"trainer.scheduler": "sync"})).run()
    off, ref, sync = (_losses(tmp_path / d) for d in ("off", "ref", "sync"))
    np.testing.assert_allclose(off, ref, rtol=1e-6)
    assert not np.allclose(off[2:], sync[2:], rtol=1e-6), "staleness made no difference: the test cannot fail"


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["sync", "one_step_off", "two_step_off"])
def test_resume_after_sigkill_is_bitwise(assets, tmp_path, scheduler):
    over = {"trainer.max_steps": 6, "gold.lmbda": 0.5, "trainer.scheduler": scheduler, "checkpoint.every": 2}
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    run(make_cfg(assets, ref_dir, **over))
    cfg = make_cfg(assets, kill_dir, **over)
    script = ("import sys, ml_collections, json; sys.path.insert(0, 'tests');"
              "from gold_jax.trainer import Trainer;"
              f"Trainer(ml_collections.ConfigDict(json.loads({cfg.to_json()!r}))).run()")
    env = dict(os.environ, GOLD_JAX_KILL_AT_STEP="3", PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-3000:]
    run(make_cfg(assets, kill_dir, **over))
    assert _losses(kill_dir) == _losses(ref_dir)


@pytest.mark.slow
def test_teacher_cache_reused_in_the_second_epoch(assets, tmp_path):
    from gold_jax.trainer import Trainer
    over = {"trainer.max_steps": 12, "trainer.num_epochs": 2, "gold.lmbda": 0.0, "checkpoint.enabled": False,
            "trainer.scheduler": "sync"}
    t = Trainer(make_cfg(assets, tmp_path / "cached", **over, **{"teacher.cache_dir": str(tmp_path / "cache")}))
    t.run()
    # Epoch 2 (steps 8..11) is read back, and so is the final validation (its 16 rows are train rows).
    assert t.scorer.hits == 4 * 8 + 16 and t.scorer.misses == 8 * 8
    Trainer(make_cfg(assets, tmp_path / "plain", **over)).run()
    np.testing.assert_allclose(_losses(tmp_path / "cached"), _losses(tmp_path / "plain"), rtol=1e-6)


@pytest.mark.slow
def test_teacher_restart_mid_run_loses_no_step(assets, tmp_path):
    import socket
    import threading
    import time

    from gold_jax.teacher import start_local_teacher
    from gold_jax.trainer import Trainer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    teachers = [start_local_teacher(assets["teacher"], port=port, in_process=False)]
    metrics = os.path.join(tmp_path, "metrics.jsonl")
    events = []

    def chaos():
        while not (os.path.exists(metrics) and len(read_jsonl(metrics)) >= 2):
            time.sleep(0.05)
        teachers[0].process.kill()
        events.append(("killed", len(read_jsonl(metrics))))
        time.sleep(3.0)
        teachers.append(start_local_teacher(assets["teacher"], port=port, in_process=False))
        events.append(("restarted", len(read_jsonl(metrics))))

    th = threading.Thread(target=chaos, daemon=True)
    th.start()
    cfg = make_cfg(assets, tmp_path, **{"trainer.max_steps": 8, "teacher.address": f"tcp://127.0.0.1:{port}",
                                        "teacher.timeout_s": 2.0, "teacher.max_retries": 1, "teacher.wait_s": 120.0,
                                        "checkpoint.enabled": False, "trainer.scheduler": "sync",
                                        "trainer.log_every": 1})
    try:
        Trainer(cfg).run()
        th.join(timeout=60)
    finally:
        for t in teachers:
            t.close()
    assert [e[0] for e in events] == ["killed", "restarted"]
    assert events[0][1] < 8, "the teacher was killed after the run ended: the test proves nothing"
    assert [r["step"] for r in read_jsonl(metrics)] == list(range(1, 9))


@pytest.mark.slow
def test_disjoint_rollout_and_training_devices(assets, tmp_path):
    import jax
    from gold_jax.trainer import Trainer
    t = Trainer(make_cfg(assets, tmp_path, **{"trainer.max_steps": 3, "gold.lmbda": 1.0, "rollout.n_devices": 4,
                                              "checkpoint.enabled": False}))
    train_ids = {d.id for d in t.devices.train}
    roll_ids = {d.id for leaf in jax.tree.leaves(t.engine._state) for d in leaf.devices()}
    assert train_ids == {0, 1, 2, 3} and roll_ids == {4, 5, 6, 7}
    t.run()
    recs = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["gold/is_on_policy"] for r in recs] == [1.0] * 3 and all(r["timing/sync"] > 0 for r in recs[1:])

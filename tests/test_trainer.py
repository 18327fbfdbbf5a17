"""End-to-end GOLD runs on tiny models (levanter's "pulse" test): metrics, λ, schedulers, resume.

The default suite trains once (`pulse`, 6 steps) and resumes that run once (`resumed`: a corrupt last
checkpoint, its fallback, a teacher that drops requests during evaluation); everything else here is
either a unit test or marked slow.
"""
import json
import os
import shutil
import struct
import subprocess
import sys
from concurrent.futures import Future

import numpy as np
import pytest
import run_builder

from gold_jax import config as config_lib
from gold_jax.metrics import STEP_METRICS, MetricsWriter, read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cfg):
    from gold_jax.trainer import Trainer
    return Trainer(cfg).run()


@pytest.fixture(scope="module")
def pulse(tiny_run_config, tmp_path_factory):
    """One run of 6 steps, one_step_off, lmbda 0.5, on the default 8-device mesh (checkpoints 4 and 6 kept)."""
    run_dir = tmp_path_factory.mktemp("pulse")
    cfg = tiny_run_config(run_dir, **{"trainer.max_steps": 6, "gold.lmbda": 0.5, "trainer.eval_every": 3,
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


def test_completions_and_metrics_share_step_numbers(pulse):
    """Completions of update t are logged under t, as its metrics are (log_completions_every=2)."""
    comps = [json.loads(x) for x in open(os.path.join(pulse, "completions.jsonl"))]
    metric_steps = {r["step"] for r in read_jsonl(os.path.join(pulse, "metrics.jsonl"))}
    assert sorted({c["step"] for c in comps}) == [2, 4, 6]
    assert {c["step"] for c in comps} <= metric_steps
    on_policy = {r["step"]: bool(r["gold/is_on_policy"]) for r in read_jsonl(os.path.join(pulse, "metrics.jsonl"))}
    assert all(c["on_policy"] == on_policy[c["step"]] for c in comps)


class FlakyTeacher:
    """A teacher handle whose first `fail` score requests are lost (their futures time out)."""

    def __init__(self, inner, fail):
        self.inner, self.fail, self.failed = inner, fail, 0

    def score(self, seq, *, cacheable=False):
        if self.failed < self.fail:
            self.failed += 1
            f = Future()
            f.set_exception(TimeoutError("no reply (FlakyTeacher)"))
            return f
        return self.inner.score(seq, cacheable=cacheable)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _flip_bits(step_dir, n=64):
    """Flip bits spread over the largest array file of the saved train state."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
    target = max(files, key=os.path.getsize)
    data = bytearray(open(target, "rb").read())
    for i in np.linspace(0, len(data) - 1, n).astype(int):
        data[i] ^= 0xFF
    open(target, "wb").write(bytes(data))
    return target


@pytest.fixture(scope="module")
def resumed(pulse, tiny_run_config, tmp_path_factory):
    """The pulse run with its last checkpoint (6) corrupted: the error; then step 6 deleted and the run
    resumed from step 4, its first validation batches lost by the teacher."""
    from gold_jax.checkpoint import CorruptCheckpointError
    from gold_jax.trainer import Trainer
    run_dir = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(pulse, run_dir)
    flipped = _flip_bits(run_dir / "checkpoints" / "6")
    cfg = tiny_run_config(run_dir, **{"trainer.max_steps": 6, "trainer.eval_every": 3,
                                      "trainer.log_completions_every": 2})
    with pytest.raises(CorruptCheckpointError) as err:
        Trainer(cfg)
    shutil.rmtree(run_dir / "checkpoints" / "6")
    t = Trainer(cfg)
    start = t.step
    t.producer.teacher = flaky = FlakyTeacher(t.teacher, fail=2)
    ev = t.evaluate()
    t.run()
    return dict(dir=run_dir, err=err.value, flipped=flipped, start=start, eval=ev, flaky=flaky)


def test_corrupt_checkpoint_is_one_message_naming_the_fallback(resumed):
    e = resumed["err"]
    msg = str(e)
    assert "checkpoint step 6" in msg and "delete that step directory" in msg and "fall back to step 4" in msg
    assert os.path.join("checkpoints", "6") in msg
    assert e.__cause__ is None and e.__suppress_context__, "orbax's chained tracebacks leak through"


def test_fallback_resumes_from_the_previous_step(pulse, resumed):
    assert resumed["start"] == 4
    losses = lambda d: {r["step"]: r["actor/jsd_loss"] for r in read_jsonl(os.path.join(d, "metrics.jsonl"))}  # noqa: E731
    ref, got = losses(pulse), losses(resumed["dir"])
    assert [got[s] for s in (5, 6)] == [ref[s] for s in (5, 6)], "the resume did not continue from step 4"


def test_resume_drops_rows_past_the_restored_step(resumed):
    recs = read_jsonl(os.path.join(resumed["dir"], "metrics.jsonl"), kind=None)
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 7))
    # 0 and 3 from the first run, 4 from the explicit evaluate(), 6 from the resumed run's end.
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [0, 3, 4, 6]
    comps = [json.loads(x) for x in open(os.path.join(resumed["dir"], "completions.jsonl"))]
    per_step = {s: sum(c["step"] == s for c in comps) for s in (2, 4, 6)}
    assert len(set(per_step.values())) == 1 and sum(per_step.values()) == len(comps), per_step


def test_evaluate_waits_for_a_lost_teacher(resumed):
    assert resumed["flaky"].failed == 2
    assert np.isfinite(resumed["eval"]["eval/jsd_loss"]) and resumed["eval"]["eval/jsd_loss"] > 0


def _tb_events(logdir):
    """(file, step, what) of every event in the tensorboard dir, files in creation order."""
    from tensorboardX.proto.event_pb2 import Event
    out = []
    for name in sorted(os.listdir(logdir)):
        data = open(os.path.join(logdir, name), "rb").read()
        pos = 0
        while pos < len(data):   # TFRecord: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            what = ev.summary.value[0].tag if ev.HasField("summary") else ev.WhichOneof("what")
            out.append((name, ev.step, what))
    return out


def test_metrics_writer_drops_rows_past_the_restart_step(tmp_path):
    """Unit: a restart at step 3 rewrites the jsonl files and tells TensorBoard to purge steps >= 4."""
    w = MetricsWriter(str(tmp_path), total_steps=6, tensorboard=True, progress_bar=False, keep_through=-1)
    for s in range(1, 6):
        w.write(s, {"actor/jsd_loss": 1.0 / s})
        w.samples(s, [{"prompt": "p", "completion": "c", "teacher_nll": 0.5, "on_policy": False}])
    w.close()
    w = MetricsWriter(str(tmp_path), total_steps=6, initial_step=3, tensorboard=True, progress_bar=False,
                      keep_through=3)
    for s in (4, 5, 6):
        w.write(s, {"actor/jsd_loss": 2.0 / s})
    w.close()
    recs = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], r["actor/jsd_loss"]) for r in recs] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.5),
                                                               (5, 0.4), (6, 1 / 3)]
    assert [json.loads(x)["step"] for x in open(tmp_path / "completions.jsonl")] == [1, 2, 3]
    events = _tb_events(str(tmp_path / "tensorboard"))
    files = sorted({f for f, _, _ in events})
    assert len(files) == 2
    second = [(s, w) for f, s, w in events if f == files[1]]
    assert (4, "session_log") in second, second   # the purge marker: TensorBoard hides the old steps >= 4


def test_producer_signals_the_end_of_the_data():
    import ml_collections

    from gold_jax.batches import END_OF_DATA, BatchProducer
    cfg = ml_collections.ConfigDict({"gold": {"lmbda": 0.0, "seq_kd": False}})
    prod = BatchProducer(cfg, iter([]), engine=None, teacher=None, rng=np.random.default_rng(0))
    assert prod.produce(0) is END_OF_DATA


def test_teacher_handle_routes_cacheable_rows_and_closes_all():
    from gold_jax.teacher.handle import TeacherHandle
    calls, closed = [], []

    class Fake:
        def __init__(self, name):
            self.name = name

        def score(self, seq, *, top_k, temperature, **kw):
            calls.append((self.name, top_k, temperature, kw))
            return Future()

        def close(self):
            closed.append(self.name)

    h = TeacherHandle(Fake("client"), top_k=8, temperature=0.9, cache=Fake("cache"), server=Fake("server"))
    h.score("seq", cacheable=True)
    h.score("seq", cacheable=False)
    assert calls == [("cache", 8, 0.9, {"cache": True}), ("client", 8, 0.9, {})]
    h.close()
    h.close()   # idempotent
    assert closed == ["client", "server"]
    calls.clear()
    TeacherHandle(Fake("client"), top_k=4, temperature=1.0).score("seq", cacheable=True)
    assert calls == [("client", 4, 1.0, {})]


def test_eval_hooks_merge_and_are_all_closed():
    from gold_jax.components import EvalHooks
    log = []

    class Hook:
        def __init__(self, name, fail_close=False):
            self.name, self.fail_close = name, fail_close

        def evaluate(self, student):
            return {f"eval/{self.name}": student()}

        def end_of_run(self):
            log.append(("end", self.name))

        def close(self):
            log.append(("close", self.name))
            if self.fail_close:
                raise OSError("disk gone")

    hooks = EvalHooks([Hook("a", fail_close=True), Hook("b")])
    assert hooks.evaluate(lambda: 1.0) == {"eval/a": 1.0, "eval/b": 1.0}
    hooks.end_of_run()
    hooks.close()   # a failing close does not keep the next hook open
    assert log == [("end", "a"), ("end", "b"), ("close", "a"), ("close", "b")]
    assert not hooks and not EvalHooks([])


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


def test_bad_config_fails_naming_the_key(tiny_run_config, tmp_path):
    for key, val, needle in [("gold.beta", 1.5, "gold.beta"), ("gold.lmbda", -0.1, "gold.lmbda"),
                             ("gold.temperature", 0.0, "gold.temperature"),
                             ("trainer.scheduler", "async", "trainer.scheduler")]:
        cfg = tiny_run_config(tmp_path, **{key: val})
        with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
            config_lib.validate(cfg, 8)
    cfg = tiny_run_config(tmp_path, **{"mesh.tensor": 3})
    with pytest.raises(ValueError, match="mesh"):
        config_lib.validate(cfg, 8)
    cfg = tiny_run_config(tmp_path)
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
def test_on_policy_ratio_tracks_lmbda(tiny_run_config, tmp_path, lmbda):
    cfg = tiny_run_config(tmp_path, **{"trainer.max_steps": 40, "gold.lmbda": lmbda, "checkpoint.enabled": False,
                                        "trainer.scheduler": "sync", "data.max_response_length": 4})
    run(cfg)
    ratio = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))[-1]["gold/on_policy_ratio"]
    assert abs(ratio - lmbda) <= 0.2


@pytest.mark.slow
def test_schedulers_agree_when_off_policy(tiny_run_config, tmp_path):
    out = {}
    for sched in ("sync", "one_step_off", "two_step_off"):
        cfg = tiny_run_config(tmp_path / sched, **{"trainer.max_steps": 4, "gold.lmbda": 0.0,
                                                    "trainer.scheduler": sched, "checkpoint.enabled": False})
        run(cfg)
        out[sched] = _losses(tmp_path / sched)
    # Same batches in the same order: equal to float32 rounding (teacher batching may regroup requests).
    np.testing.assert_allclose(out["one_step_off"], out["sync"], rtol=1e-6)
    np.testing.assert_allclose(out["two_step_off"], out["sync"], rtol=1e-6)


@pytest.mark.slow
def test_one_step_off_equals_sync_fed_stale_weights(tiny_run_config, tmp_path):
    from flax import nnx
    from gold_jax.trainer import Trainer, _copy

    class StaleSync(Trainer):
        """sync, but the engine gets θ_{t-1} before generating the batch for step t."""
        def _sync(self):
            cur, prev = _copy(self.state.params), getattr(self, "_prev", None)
            if prev is not None:
                self.engine.sync_weights(nnx.merge(self.graphdef, prev))
            self._prev = cur
            return 0.0

    over = {"trainer.max_steps": 4, "gold.lmbda": 1.0, "checkpoint.enabled": False, "optimizer.lr": 3e-2}
    Trainer(tiny_run_config(tmp_path / "off", **over, **{"trainer.scheduler": "one_step_off"})).run()
    StaleSync(tiny_run_config(tmp_path / "ref", **over, **{"trainer.scheduler": "sync"})).run()
    Trainer(tiny_run_config(tmp_path / "sync", **over, **{"trainer.scheduler": "sync"})).run()
    off, ref, sync = (_losses(tmp_path / d) for d in ("off", "ref", "sync"))
    np.testing.assert_allclose(off, ref, rtol=1e-6)
    assert not np.allclose(off[2:], sync[2:], rtol=1e-6), "staleness made no difference: the test cannot fail"


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["sync", "one_step_off", "two_step_off"])
def test_resume_after_sigkill_is_bitwise(tiny_run_config, tmp_path, scheduler):
    over = {"trainer.max_steps": 6, "gold.lmbda": 0.5, "trainer.scheduler": scheduler, "checkpoint.every": 2}
    # The test's own hook, not the trainer's: SIGKILL right after step 3's metrics row (checkpoint at 2).
    ref_dir, kill_dir = run_builder.ref_and_killed_runs(tiny_run_config, tmp_path, over, step=3)
    assert [r["step"] for r in read_jsonl(os.path.join(kill_dir, "metrics.jsonl"))] == list(range(1, 7))
    assert _losses(kill_dir) == _losses(ref_dir)


@pytest.mark.slow
def test_teacher_cache_reused_in_the_second_epoch(tiny_run_config, tmp_path):
    from gold_jax.trainer import Trainer
    over = {"trainer.max_steps": 12, "trainer.num_epochs": 2, "gold.lmbda": 0.0, "checkpoint.enabled": False,
            "trainer.scheduler": "sync"}
    t = Trainer(tiny_run_config(tmp_path / "cached", **over, **{"teacher.cache_dir": str(tmp_path / "cache")}))
    t.run()
    # Epoch 2 (steps 8..11) is read back, and so is the final validation (its 16 rows are train rows).
    assert t.teacher.cache.hits == 4 * 8 + 16 and t.teacher.cache.misses == 8 * 8
    Trainer(tiny_run_config(tmp_path / "plain", **over)).run()
    np.testing.assert_allclose(_losses(tmp_path / "cached"), _losses(tmp_path / "plain"), rtol=1e-6)


@pytest.mark.slow
def test_teacher_restart_mid_run_loses_no_step(tiny_assets, tiny_run_config, tmp_path):
    import socket
    import threading
    import time

    from gold_jax.teacher import start_local_teacher
    from gold_jax.trainer import Trainer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    teachers = [start_local_teacher(tiny_assets["teacher"], port=port, in_process=False)]
    metrics = os.path.join(tmp_path, "metrics.jsonl")
    events = []

    def chaos():
        while not (os.path.exists(metrics) and len(read_jsonl(metrics)) >= 2):
            time.sleep(0.05)
        teachers[0].process.kill()
        events.append(("killed", len(read_jsonl(metrics))))
        time.sleep(3.0)
        teachers.append(start_local_teacher(tiny_assets["teacher"], port=port, in_process=False))
        events.append(("restarted", len(read_jsonl(metrics))))

    th = threading.Thread(target=chaos, daemon=True)
    th.start()
    cfg = tiny_run_config(tmp_path, **{"trainer.max_steps": 8, "teacher.address": f"tcp://127.0.0.1:{port}",
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
def test_disjoint_rollout_and_training_devices(tiny_run_config, tmp_path):
    import jax
    from gold_jax.trainer import Trainer
    t = Trainer(tiny_run_config(tmp_path, **{"trainer.max_steps": 3, "gold.lmbda": 1.0, "rollout.n_devices": 4,
                                              "checkpoint.enabled": False}))
    train_ids = {d.id for d in t.devices.train}
    roll_ids = {d.id for leaf in jax.tree.leaves(t.engine._state) for d in leaf.devices()}
    assert train_ids == {0, 1, 2, 3} and roll_ids == {4, 5, 6, 7}
    t.run()
    recs = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["gold/is_on_policy"] for r in recs] == [1.0] * 3 and all(r["timing/sync"] > 0 for r in recs[1:])


@pytest.mark.slow
def test_demo_run_applies_its_lengths_and_hooks(tmp_path):
    """configs/gold.py on the embedded demo (tiny preset): demo data lengths, accuracy hook, plot at the end."""
    from configs import gold
    c = gold.get_config("runlocal")
    c.run_dir, c.demo.cache_dir, c.demo.preset, c.demo.eval_n = str(tmp_path / "run"), str(tmp_path / "demo"), "tiny", 16
    c.trainer.max_steps, c.trainer.eval_every, c.checkpoint.enabled = 2, 0, False
    c.trainer.progress_bar = c.trainer.tensorboard = False
    run(c)
    cfg = json.load(open(tmp_path / "run" / "config.json"))
    assert (cfg["data"]["max_prompt_length"], cfg["data"]["max_response_length"]) == (32, 16)
    evals = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"), kind="eval")
    assert [e["step"] for e in evals] == [0, 2] and all(0 <= e["eval/accuracy"] <= 1 for e in evals)
    assert os.path.getsize(tmp_path / "run" / "metrics.png") > 1000

"""Multi-process runs on one machine: 2 processes x 4 fake CPU devices against 1 process x 8.

The processes are started exactly as launch/tpu_pod.sh and launch/slurm_gpu.sbatch start
them: `python -m gold_jax.train --config ... --config.distributed.*`, here with the
coordinator on 127.0.0.1 and JAX's Gloo CPU collectives (the default CPU collectives of
JAX 0.10, `jax_cpu_collectives_implementation="gloo"`). Every child runs under a timeout:
a disagreement between processes must fail, never hang.
"""
import collections
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gold_jax.demo import task
from gold_jax.metrics import read_jsonl
from gold_jax.models import ModelConfig, init_model
from gold_jax.models.hf_io import save_pretrained
from tiny_tokenizer import tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600
pytestmark = pytest.mark.slow


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
    root = str(tmp_path_factory.mktemp("mp_assets"))
    tok = tiny_tokenizer()
    rng = np.random.default_rng(0)
    rows = [task.make_row(rng.integers(0, 10, 4), "train", i) for i in range(64)]
    train = os.path.join(root, "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows), train)
    return dict(student=_model_dir(root, "student", tok, 32, 1, 1), teacher=_model_dir(root, "teacher", tok, 48, 2, 2),
                train=train)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The CLI with the test's own fault: SIGKILL right after step KILL_AFTER's metrics row, on every
# process (process 1's writer is disabled, but its write() is still called).
KILL_SCRIPT = """
import os, signal
from gold_jax import cli_errors, metrics, train
write = metrics.MetricsWriter.write
def write_then_die(self, step, rec, kind="train"):
    write(self, step, rec, kind)
    if kind == "train" and step == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
metrics.MetricsWriter.write = write_then_die
cli_errors.run_absl(train.main)
"""


def launch(assets, run_dir, n_proc, n_dev, *overrides, per_process=None, timeout=TIMEOUT_S, kill_after=0):
    """Start n_proc trainer processes (n_dev CPU devices each); returns [(returncode, output)].

    per_process: {process_id: [extra overrides]} (to make one process disagree)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n_dev}", KILL_AFTER=str(kill_after))
    cli = ["-c", KILL_SCRIPT] if kill_after else ["-m", "gold_jax.train"]
    base = [sys.executable, *cli, "--config", "configs/tiny.py", f"--config.run_dir={run_dir}",
            f"--config.model.student_path={assets['student']}", f"--config.model.teacher_path={assets['teacher']}",
            f"--config.data.train_files={assets['train']}", "--config.trainer.log_completions_every=1",
            *overrides]
    port = _free_port()
    procs = []
    for i in range(n_proc):
        dist = [] if n_proc == 1 else [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                                       f"--config.distributed.num_processes={n_proc}",
                                       f"--config.distributed.process_id={i}"]
        log = open(os.path.join(str(run_dir) + f".p{i}.log"), "w+")
        procs.append((subprocess.Popen(base + dist + list((per_process or {}).get(i, [])), cwd=REPO, env=env,
                                       stdout=log, stderr=subprocess.STDOUT), log))
    out = []
    try:
        for p, log in procs:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for q, _ in procs:
                    q.kill()
                raise AssertionError(f"process did not finish in {timeout}s (a hang): see {log.name}")
            log.seek(0)
            out.append((p.returncode, log.read()))
    finally:
        for q, log in procs:
            if q.poll() is None:
                q.kill()
            log.close()
    return out


def _ok(results):
    for i, (rc, text) in enumerate(results):
        assert rc == 0, f"process {i} exited {rc}:\n{text[-3000:]}"


def _losses(run_dir):
    """(steps, losses, on-policy flags), the last record of each step (a resume rewrites one)."""
    last = {r["step"]: r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))}
    steps = sorted(last)
    return steps, np.array([last[k]["actor/jsd_loss"] for k in steps]), [last[k]["gold/is_on_policy"] for k in steps]


def test_two_processes_match_one_and_resume(assets, tmp_path):
    """2x4 devices, killed after step 3 and resumed from the step-2 checkpoint, against 1x8 devices
    run straight through: same global batch, 6 steps, one_step_off (the checkpoint holds a queued batch)."""
    over = ["--config.gold.lmbda=0.0", "--config.checkpoint.every=2", "--config.trainer.max_steps=6"]
    one = tmp_path / "one"
    _ok(launch(assets, one, 1, 8, *over))
    two = tmp_path / "two"
    killed = launch(assets, two, 2, 4, *over, kill_after=3)
    assert all(rc != 0 for rc, _ in killed), "the fault injection did not stop the run"
    ck = two / "checkpoints" / "2"
    # Each process wrote its own shards of the state; the queued batch (each process's rows)
    # and the host JSON were written once, by process 0.
    procs = lambda d: sorted(p.name for p in d.iterdir() if p.name.startswith("ocdbt.process_"))  # noqa: E731
    assert procs(ck / "state") == ["ocdbt.process_0", "ocdbt.process_1"]
    assert procs(ck / "pending") == ["ocdbt.process_0"]
    _ok(launch(assets, two, 2, 4, *over))
    recs = read_jsonl(os.path.join(two, "metrics.jsonl"))
    # Process 0 alone writes metrics: one row per step, apart from step 3, which the killed run
    # wrote before the resume from step 2 wrote it again (a writer may also drop the killed row).
    steps = [r["step"] for r in recs]
    assert sorted(set(steps)) == list(range(1, 7)) and all(steps.count(k) == 1 for k in (1, 2, 4, 5, 6)), steps
    s1, l1, on1 = _losses(one)
    s2, l2, on2 = _losses(two)
    assert s1 == s2 == list(range(1, 7))
    assert on1 == on2 == [0.0] * 6
    # Step 1 starts from the same weights: only the order of the float32 sums differs (the psum
    # over 2 processes x 4 devices against 8 devices of one process), so it agrees to rounding.
    # Later steps carry that rounding through Adam, whose update divides tiny gradients by
    # their own running RMS at lr 3e-3: measured 2.4e-5 relative by step 4, hence a looser bound.
    np.testing.assert_allclose(l2[0], l1[0], rtol=5e-6)
    np.testing.assert_allclose(l2, l1, rtol=5e-4)
    print(f"max |2x4 - 1x8| relative loss difference: step 1 {abs(l2[0] / l1[0] - 1):.3g}, "
          f"steps 1-6 {np.abs(l2 / l1 - 1).max():.3g}")
    comps = [json.loads(x) for x in open(two / "completions.jsonl")]
    per_step = collections.Counter(c["step"] for c in comps)
    # log_completions_n=2 rows a step, from process 0 only (a second writer would double every
    # step); the step the killed run logged last may be logged again after the resume.
    assert len(per_step) == 6 and sorted(per_step.values()) in ([2] * 6, [2] * 5 + [4]), per_step


def test_on_policy_with_two_processes_fails_at_start(assets, tmp_path):
    """The rollout engines are single-host: lmbda > 0 on 2 processes is refused before any work."""
    res = launch(assets, tmp_path / "onpol", 2, 4, "--config.gold.lmbda=0.5", timeout=300)
    for rc, text in res:
        assert rc != 0 and "rollout engines are single-host" in text, text[-3000:]
    assert not os.path.exists(tmp_path / "onpol" / "metrics.jsonl")


def test_config_mismatch_fails_on_every_process(assets, tmp_path):
    res = launch(assets, tmp_path / "bad", 2, 4, "--config.trainer.max_steps=2", "--config.gold.lmbda=0.0",
                 per_process={1: ["--config.seed=1"]}, timeout=300)
    for rc, text in res:
        assert rc != 0 and "processes disagree on the run config" in text, text[-3000:]

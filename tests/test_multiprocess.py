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


# The CLI with the test's own fault: process FLIP_PROCESS draws the opposite λ coin at every batch.
FLIP_SCRIPT = """
import os, jax
from gold_jax import cli_errors, onpolicy, train
coin = onpolicy.coin
def flipped(rng, lmbda):
    c = coin(rng, lmbda)
    return (not c) if jax.process_index() == int(os.environ["FLIP_PROCESS"]) else c
onpolicy.coin = flipped
cli_errors.run_absl(train.main)
"""


def launch(assets, run_dir, n_proc, n_dev, *overrides, per_process=None, timeout=TIMEOUT_S, kill_after=0,
           flip_process=-1):
    """Start n_proc trainer processes (n_dev CPU devices each); returns [(returncode, output)].

    per_process: {process_id: [extra overrides]} (to make one process disagree)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n_dev}", KILL_AFTER=str(kill_after),
               FLIP_PROCESS=str(flip_process))
    cli = ["-c", KILL_SCRIPT] if kill_after else ["-c", FLIP_SCRIPT] if flip_process >= 0 else ["-m", "gold_jax.train"]
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


def _completions(run_dir):
    """{step: [completion text of global rows 0 and 1]}: process 0 logs its first two rows, which are
    global rows 0 and 1 in both layouts."""
    out = collections.defaultdict(list)
    for c in map(json.loads, open(os.path.join(run_dir, "completions.jsonl"))):
        out[c["step"]].append((c["completion"], c["on_policy"]))
    return dict(out)


@pytest.mark.parametrize("granularity", ["batch", "sample"])
def test_per_host_rollout_matches_one_process(assets, tmp_path, granularity):
    """lmbda 0.5: 2 processes x 4 devices, each sampling its own 4 rows with its gathered copy of the
    student, against 1 process x 8 devices sampling all 8 rows; same global batch and seed.

    A row's sampling randomness is keyed on its global row index (fold_in(seed, row)), the λ coins are
    drawn for the global batch from the shared RNG, so both layouts sample the same tokens from the
    same weights: the on-policy flags and the logged completions are equal, and the losses agree as
    at lmbda 0 (float32 summation order, carried through Adam)."""
    # seed 1: batch coins on, off, off, on; row coins mixed within each process's rows
    over = ["--config.seed=1", "--config.gold.lmbda=0.5", f"--config.gold.lmbda_granularity={granularity}",
            "--config.checkpoint.enabled=False", "--config.trainer.max_steps=4", "--config.gold.temperature=1.0"]
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(launch(assets, one, 1, 8, *over))
    _ok(launch(assets, two, 2, 4, *over))
    s1, l1, on1 = _losses(one)
    s2, l2, on2 = _losses(two)
    assert s1 == s2 == [1, 2, 3, 4]
    assert on1 == on2, (on1, on2)
    assert any(x > 0 for x in on1) and any(x < 1 for x in on1), on1   # both kinds of batch (or row)
    ratio = lambda d: [r["gold/on_policy_ratio"] for r in read_jsonl(os.path.join(d, "metrics.jsonl"))]  # noqa: E731
    assert ratio(one) == ratio(two)
    c1, c2 = _completions(one), _completions(two)
    assert c1 == c2, (c1, c2)
    np.testing.assert_allclose(l2[0], l1[0], rtol=5e-6)
    np.testing.assert_allclose(l2, l1, rtol=5e-4)
    print(f"[{granularity}] on-policy {on1}; max |2x4 - 1x8| relative loss difference: step 1 "
          f"{abs(l2[0] / l1[0] - 1):.3g}, steps 1-4 {np.abs(l2 / l1 - 1).max():.3g}")


def test_coin_mismatch_fails_loudly(assets, tmp_path):
    """Process 1 draws the opposite λ coin (injected by FLIP_SCRIPT): both processes stop at the first
    batch with a message naming both processes' values, well inside the timeout (no hang)."""
    res = launch(assets, tmp_path / "flip", 2, 4, "--config.gold.lmbda=0.5", "--config.trainer.max_steps=2",
                 "--config.checkpoint.enabled=False", timeout=300, flip_process=1)
    for rc, text in res:
        assert rc != 0 and "processes disagree on the decisions for the next batch" in text, text[-3000:]
        assert "process 0: {" in text and "process 1: {" in text, text[-3000:]
    print(next(line for line in res[0][1].splitlines() if "process 0: {" in line))
    metrics = tmp_path / "flip" / "metrics.jsonl"
    assert not os.path.exists(metrics) or not [r for r in read_jsonl(str(metrics)) if "actor/jsd_loss" in r]


def test_config_mismatch_fails_on_every_process(assets, tmp_path):
    res = launch(assets, tmp_path / "bad", 2, 4, "--config.trainer.max_steps=2", "--config.gold.lmbda=0.0",
                 per_process={1: ["--config.seed=1"]}, timeout=300)
    for rc, text in res:
        assert rc != 0 and "processes disagree on the run config" in text, text[-3000:]


# Each process: a [16, 8] array sharded over the 2-process mesh by several specs -> LocalCopy ->
# every process holds all of it on its own devices (fully addressable), on a mesh of its devices only.
LOCAL_COPY_SCRIPT = """
import sys
import jax, numpy as np
pid, port, shape = int(sys.argv[1]), sys.argv[2], tuple(int(x) for x in sys.argv[3].split("x"))
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
from jax.sharding import NamedSharding, PartitionSpec as P
from gold_jax.sharding import make_mesh
from gold_jax.rollout import per_host
mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
full = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
specs = [P(("data", "fsdp"), "tensor"), P("fsdp", None), P(None, "tensor"), P(), P("data", None)]
xs = [jax.make_array_from_callback(full.shape, NamedSharding(mesh, s), lambda i: full[i]) for s in specs]
copy = per_host.LocalCopy(mesh)
for s, out in zip(specs, copy(xs)):
    assert out.is_fully_addressable and {d.process_index for d in out.sharding.device_set} == {pid}, s
    np.testing.assert_array_equal(np.asarray(out), full)
print("LOCAL_COPY_OK", pid, per_host.spanning_axes(mesh), dict(copy.local.shape))
"""


@pytest.mark.parametrize("shape", ["2x4x1", "1x8x1", "2x2x2", "1x4x2"])
def test_local_copy_gathers_to_every_host(shape):
    """The weight path of per-host rollout: hosts on data (gather over data only), fsdp or tensor across
    hosts (gather over them), a mix; each process ends with the full values on its own devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", LOCAL_COPY_SCRIPT, str(i), str(port), shape], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, text) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"LOCAL_COPY_OK {i}" in text, text[-3000:]

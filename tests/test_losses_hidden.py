"""Fused JSD against a hidden-state teacher (fused_jsd mode "hidden") vs a float64 NumPy reference.

The reference materialises both logits in float64 (hidden @ head), drops the
embedding-padding columns and takes the dense JSD (jsd_reference.ref_dense);
its gradient comes from central differences of that reference over the
logits, chained through the two matmuls. The fused path never builds [N, V].
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gold_jax.losses import fused as fused_mod
from gold_jax.losses.fused import fused_hidden_jsd, fused_jsd
from gold_jax.sharding import make_mesh
from gold_jax.sharding.rules import logical_to_sharding
from jsd_reference import ref_dense

BETAS, TEMPS = (0.0, 0.5, 1.0), (0.5, 1.0, 2.0)
# 15 tokens in chunks of 4 (the last chunk overlaps); the tokenizer has 64 ids, the student head 67
# columns and the teacher head 72 (a wider teacher) or 64 (a narrower one): the padding columns hold
# junk far above every real logit, as an untrained embedding row could.
SHAPE, H, HT, VOCAB, VS, CHUNK = (3, 5), 16, 24, 64, 67, 4
TEACHER_WIDTHS = (72, 64)


def make_case(seed, teacher_width, shape=SHAPE, student_width=VS, vocab=VOCAB):
    r = np.random.default_rng(seed)
    h = r.normal(size=shape + (H,)).astype(np.float32)
    w = (r.normal(size=(H, student_width)) * 0.6).astype(np.float32)
    th = r.normal(size=shape + (HT,)).astype(np.float32)
    tw = (r.normal(size=(HT, teacher_width)) * 0.5).astype(np.float32)
    w[:, vocab:] = 40.0 * np.sign(h.reshape(-1, H).sum(0))[:, None]  # junk logits ~ +1e2 in the padding
    tw[:, vocab:] = 40.0 * np.sign(th.reshape(-1, HT).sum(0))[:, None]
    mask = (r.random(shape) < 0.75).astype(np.float32)
    mask[0, :2], mask[-1, -1] = 1, 0
    return h, w, th, tw, mask


def reference(h, w, th, tw, mask, beta, temp, vocab=VOCAB, eps=1e-5):
    """(per-token JSD, batchmean loss, d loss / d h, d loss / d w) in float64."""
    h64, w64 = h.astype(np.float64), w.astype(np.float64)
    s = h64 @ w64
    t = th.astype(np.float64) @ tw.astype(np.float64)
    per_token = ref_dense(s, t, beta, temp, vocab_size=vocab)
    kept = mask.astype(bool)
    loss = per_token[kept].sum() / kept.sum()
    g_s = np.zeros_like(s)
    for j in range(vocab):  # each token's loss depends on its own row: one column for all tokens at once
        d = np.zeros_like(s)
        d[..., j] = eps
        g_s[..., j] = (ref_dense(s + d, t, beta, temp, vocab_size=vocab)
                       - ref_dense(s - d, t, beta, temp, vocab_size=vocab)) / (2 * eps)
    g_s *= (mask / kept.sum())[..., None]
    g_h = g_s @ w64.T
    g_w = h64.reshape(-1, H).T @ g_s.reshape(-1, g_s.shape[-1])
    return per_token, loss, g_h, g_w


@pytest.fixture(scope="module", params=TEACHER_WIDTHS, ids=lambda v: f"teacher_width{v}")
def results(request):
    """Every (beta, T) in one compiled program, with small column tiles and CPU row groups of 2."""
    h, w, th, tw, mask = case = make_case(request.param, request.param)

    def go(h, w, th, tw):
        out = {}
        for beta in BETAS:
            for temp in TEMPS:
                kw = dict(beta=beta, temperature=temp, vocab_size=VOCAB, chunk_size=CHUNK)

                def mean(a, b, c, d, kw=kw):
                    per_token = fused_hidden_jsd(a, b, c, d, mask, reduction="none", **kw)
                    return jnp.sum(per_token) / mask.sum(), per_token
                (loss, per_token), grads = jax.value_and_grad(mean, argnums=(0, 1, 2, 3), has_aux=True)(
                    h, w, th, tw)
                batchmean = fused_hidden_jsd(h, w, th, tw, mask, **kw)
                out[beta, temp] = (per_token, loss, batchmean, grads)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused_mod, "TILE_ELEMS", H * 10)  # 10 columns per tile: the last tile overlaps
        mp.setattr(fused_mod, "ROW_ELEMS", VS * 2)  # CPU forward: 2 rows per group
        got = jax.device_get(jax.jit(go)(h, w, th, tw))
    return case, got


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temp", TEMPS)
def test_hidden_matches_float64_reference(results, beta, temp):
    (h, w, th, tw, mask), got = results
    per_token, loss, batchmean, (g_h, g_w, g_th, g_tw) = got[beta, temp]
    ref_tok, ref_loss, ref_gh, ref_gw = reference(h, w, th, tw, mask, beta, temp)
    kept = mask.astype(bool)
    assert ref_tok[kept].max() > 5e-2  # a non-trivial case
    np.testing.assert_allclose(per_token, np.where(kept, ref_tok, 0.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batchmean, ref_loss, rtol=1e-5, atol=1e-6)
    for g, ref in ((g_h, ref_gh), (g_w, ref_gw)):
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert not np.abs(g_w[:, VOCAB:]).any(), "embedding-padding columns of lm_head got a gradient"
    assert not np.abs(g_h[~kept]).any(), "masked tokens got a hidden-state gradient"
    assert not np.abs(g_th).any() and not np.abs(g_tw).any(), "the teacher got a gradient"


def test_hidden_equals_dense_mode_on_materialised_teacher():
    """The same loss as mode "dense" given the teacher's logits (the existing exact path)."""
    h, w, th, tw, mask = make_case(7, VS)
    kw = dict(beta=0.5, temperature=0.9, vocab_size=VOCAB, chunk_size=CHUNK)
    t = jnp.einsum("...h,hv->...v", th, tw)

    def both(h, w):
        a = fused_hidden_jsd(h, w, th, tw, mask, **kw)
        b = fused_jsd(h, w, None, None, mask, mode="dense", teacher_logits=t, **kw)
        return a, b
    (a, b), (ga, gb) = jax.jit(lambda h, w: (both(h, w), (jax.grad(lambda *x: both(*x)[0], (0, 1))(h, w),
                                                           jax.grad(lambda *x: both(*x)[1], (0, 1))(h, w))))(h, w)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_hidden_bad_input():
    h, w, th, tw, mask = make_case(3, 72)
    cases = [
        (lambda: fused_jsd(h, w, None, None, mask, mode="hidden", vocab_size=VOCAB), "teacher_hidden"),
        (lambda: fused_hidden_jsd(h, w, th[:, :-1], tw, mask, vocab_size=VOCAB), "teacher_hidden"),
        (lambda: fused_hidden_jsd(h, w, th, tw[:-1], mask, vocab_size=VOCAB), "teacher_head"),
        (lambda: fused_hidden_jsd(h, w, th, tw, mask), "vocab_size"),  # widths differ: the tokenizer size is needed
        (lambda: fused_hidden_jsd(h, w, th, tw[:, :60], mask, vocab_size=VOCAB), "vocab_size"),
        (lambda: fused_hidden_jsd(h, w, th, tw, mask[:, :-1], vocab_size=VOCAB), "mask"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name):
            fn()


# ---------------------------------------------------------------- sharded
P_SHAPE, P_VS, P_VT, P_VOCAB = (4, 6), 72, 80, 70


@pytest.mark.parametrize("mesh_shape", [(1, 2, 4), (2, 2, 2)], ids=["2x4", "2x2x2"])
def test_hidden_sharded_equals_unsharded(devices, mesh_shape):
    """Under jit with the student's parameter and batch shardings, the result equals the unsharded one."""
    h, w, th, tw, mask = make_case(11, P_VT, shape=P_SHAPE, student_width=P_VS, vocab=P_VOCAB)
    kw = dict(beta=0.5, temperature=0.9, vocab_size=P_VOCAB, chunk_size=8)

    def vg(h, w, th, tw, mask):
        return jax.value_and_grad(lambda a, b: fused_hidden_jsd(a, b, th, tw, mask, **kw), (0, 1))(h, w)

    fn = jax.jit(vg)
    plain = jax.device_get(fn(h, w, th, tw, mask))
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    head = lambda x: logical_to_sharding(mesh, ("embed", "vocab"), shape=x.shape)  # noqa: E731
    placed = (jax.device_put(h, batch), jax.device_put(w, head(w)), jax.device_put(th, batch),
              jax.device_put(tw, head(tw)), jax.device_put(mask, batch))
    assert not placed[1].sharding.is_fully_replicated and not placed[0].sharding.is_fully_replicated
    sharded = jax.device_get(fn(*placed))
    (loss_1, (gh_1, gw_1)), (loss, (gh, gw)) = plain, sharded
    assert loss_1 > 1e-2
    np.testing.assert_allclose(loss, loss_1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gh, gh_1, rtol=1e-5, atol=1e-6 * np.abs(gh_1).max())
    np.testing.assert_allclose(gw, gw_1, rtol=1e-5, atol=1e-6 * np.abs(gw_1).max())
    ref_tok = ref_dense(h.astype(np.float64) @ w, th.astype(np.float64) @ tw, 0.5, 0.9, vocab_size=P_VOCAB)
    np.testing.assert_allclose(loss, ref_tok[mask.astype(bool)].mean(), rtol=1e-5)

"""Dense and top-k generalized JSD against an independent float64 NumPy reference."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gold_jax.losses import generalized_jsd, topk_jsd
from jsd_reference import make_case, np_log_softmax, ref_dense, ref_topk, teacher_topk

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
TEMPS = [0.5, 0.9, 1.0, 2.0]
V, K = 37, 5


def check_reductions(fn, ref_tok, mask, vocab):
    kept = mask.astype(bool)
    total = ref_tok[kept].sum()
    np.testing.assert_allclose(fn("none"), np.where(kept, ref_tok, 0.0), rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(fn("sum"), total, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(fn("batchmean"), total / kept.sum(), rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(fn("mean"), total / (kept.sum() * vocab), rtol=2e-4, atol=2e-7)


# ---------------------------------------------------------------- dense
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temp", TEMPS)
def test_dense_matches_reference(beta, temp):
    s, t, mask = make_case(int(beta * 10 + temp * 100))
    ref = ref_dense(s, t, beta, temp)
    check_reductions(lambda red: generalized_jsd(s, t, mask, beta=beta, temperature=temp, reduction=red),
                     ref, mask, V)


def test_no_kept_token_gives_zero():
    s, t, mask = make_case(1)
    zero = np.zeros_like(mask)
    for red in ("batchmean", "sum", "mean"):
        assert float(generalized_jsd(s, t, zero, reduction=red)) == 0.0
    assert float(jax.grad(lambda x: generalized_jsd(x, t, zero))(jnp.asarray(s)).__abs__().max()) == 0.0


def test_beta_ends_are_kl():
    s, t, mask = make_case(2, extreme=False)
    lp, lq = np_log_softmax(t.astype(np.float64)), np_log_softmax(s.astype(np.float64))
    kl_pq = (np.exp(lp) * (lp - lq)).sum(-1)
    kl_qp = (np.exp(lq) * (lq - lp)).sum(-1)
    np.testing.assert_allclose(generalized_jsd(s, t, mask, beta=0.0, reduction="none"), kl_pq * mask, rtol=1e-4)
    np.testing.assert_allclose(generalized_jsd(s, t, mask, beta=1.0, reduction="none"), kl_qp * mask, rtol=1e-4)


def test_properties():
    s, t, mask = make_case(3, extreme=False)
    ones = np.ones_like(mask)
    assert np.abs(np.asarray(generalized_jsd(s, s, ones, reduction="none"))).max() < 1e-6
    jsd = np.asarray(generalized_jsd(s * 10, t * 10, ones, beta=0.5, reduction="none"))
    assert jsd.min() >= -1e-7 and jsd.max() <= math.log(2) + 1e-6
    assert jsd.max() > 0.5  # sharp, disjoint-ish distributions come close to ln 2
    for beta in BETAS:
        a = generalized_jsd(s, t, ones, beta=beta, reduction="none")
        b = generalized_jsd(t, s, ones, beta=1.0 - beta, reduction="none")
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_extreme_logits_finite_values_and_grads():
    s, t, mask = make_case(4, scale=1e4)
    ones = np.ones_like(mask)
    for beta in BETAS:
        for temp in (0.5, 2.0):
            f = lambda x: generalized_jsd(x, t, ones, beta=beta, temperature=temp)
            val, g = jax.value_and_grad(f)(jnp.asarray(s))
            assert np.isfinite(float(val)) and np.isfinite(np.asarray(g)).all()
            lt, ids, _ = teacher_topk(t, temp)
            for mode in ("tail", "renormalize"):
                g = jax.grad(lambda x: topk_jsd(x, lt, ids, ones, beta=beta, temperature=temp, mode=mode))(
                    jnp.asarray(s))
                assert np.isfinite(np.asarray(g)).all(), (beta, temp, mode)


def test_bf16_accumulates_in_float32():
    s, t, mask = make_case(5, extreme=False)
    sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    out = generalized_jsd(sb, tb, mask, reduction="none")
    assert out.dtype == jnp.float32
    ref = ref_dense(np.asarray(sb.astype(jnp.float32)), np.asarray(tb.astype(jnp.float32)), 0.5, 1.0)
    np.testing.assert_allclose(out, ref * mask, rtol=1e-4, atol=1e-6)


def test_vocab_size_masks_padding_columns():
    s, t, mask = make_case(6)
    junk = np.full(s.shape[:-1] + (5,), 3e4, np.float32)  # above every real logit: exp would overflow
    padded_s, padded_t = np.concatenate([s, junk], -1), np.concatenate([t, junk], -1)
    a = generalized_jsd(padded_s, padded_t, mask, vocab_size=V, reduction="none")
    np.testing.assert_allclose(a, generalized_jsd(s, t, mask, reduction="none"), rtol=1e-6, atol=1e-7)
    lt, ids, _ = teacher_topk(t, 1.0)
    for f in (lambda x: generalized_jsd(x, padded_t, mask, vocab_size=V),
              lambda x: topk_jsd(x, lt, ids, mask, vocab_size=V)):
        g = np.asarray(jax.grad(f)(jnp.asarray(padded_s)))
        assert np.isfinite(g).all() and not g[..., V:].any()


def test_dense_row_groups_and_padding(monkeypatch):
    """The CPU forward walks rows in groups (12 rows, at most 5 per group: 3 trips of 4 strided rows)."""
    from gold_jax.losses import dense_vjp
    s, t, _ = make_case(13)
    mask = np.ones(s.shape[:-1], np.float32)  # every row counts
    junk = np.full(s.shape[:-1] + (3,), 3e4, np.float32)
    ps, pt = np.concatenate([s, junk], -1), np.concatenate([t, junk], -1)

    def run():  # a fresh jit per setting: CHUNK_ELEMS is read at trace time
        f = lambda x, y: generalized_jsd(x, y, mask, beta=0.5, temperature=0.9, vocab_size=V)  # noqa: E731
        return jax.jit(lambda x, y: (f(x, y), jax.grad(f, argnums=(0, 1))(x, y)))(ps, pt)

    loss_1, (gs_1, gt_1) = run()
    monkeypatch.setattr(dense_vjp, "CHUNK_ELEMS", 5 * (V + 3))
    loss, (gs, gt) = run()
    ref = ref_dense(s, t, 0.5, 0.9)
    np.testing.assert_allclose(loss, ref[mask.astype(bool)].sum() / mask.sum(), rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(loss, loss_1, rtol=1e-6)
    np.testing.assert_allclose(gs, gs_1, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(gt, gt_1, rtol=1e-5, atol=1e-8)
    assert np.abs(gs).max() > 1e-3 and not gs[..., V:].any()


# ---------------------------------------------------------------- top-k
@pytest.mark.parametrize("mode", ["tail", "renormalize"])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temp", TEMPS)
def test_topk_matches_reference(mode, beta, temp):
    s, t, mask = make_case(int(beta * 10 + temp * 100) + 7)
    lt, ids, logmass = teacher_topk(t, temp)
    ref = ref_topk(s, lt, ids, beta, temp, mode)
    check_reductions(lambda red: topk_jsd(s, lt, ids, mask, beta=beta, temperature=temp, reduction=red,
                                          mode=mode), ref, mask, V)
    if mode == "tail":  # the exact log-mass from the server (float64 here) instead of logsumexp(top-k)
        ref = ref_topk(s, lt, ids, beta, temp, mode, logmass=logmass)
        got = topk_jsd(s, lt, ids, mask, beta=beta, temperature=temp, reduction="none",
                       teacher_logmass=logmass.astype(np.float32))
        np.testing.assert_allclose(got, ref * mask, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("beta", BETAS)
def test_tail_is_dense_at_full_k_and_a_lower_bound_below(beta):
    s, t, mask = make_case(8, extreme=False)
    ones = np.ones_like(mask)
    dense = np.asarray(generalized_jsd(s, t, ones, beta=beta, temperature=0.9, reduction="none"))
    lt, ids, _ = teacher_topk(t, 0.9, k=V)
    full = topk_jsd(s, lt, ids, ones, beta=beta, temperature=0.9, reduction="none")
    np.testing.assert_allclose(full, dense, rtol=1e-4, atol=1e-6)
    prev = np.zeros_like(dense)
    for k in (1, 4, 16, V - 1):  # monotone in k (coarser partition = smaller divergence) and <= dense
        # The exact log-mass, as a teacher server sends it: float32 top-k log-probs alone fix a tail
        # of ~1e-6 (k = V-1 here) only to a few percent, and at beta = 1 q_tail * that error breaks
        # the bound even in the float64 reference on those float32 inputs.
        lt, ids, logmass = teacher_topk(t, 0.9, k=k)
        tail = np.asarray(topk_jsd(s, lt, ids, ones, beta=beta, temperature=0.9, reduction="none",
                                   teacher_logmass=logmass.astype(np.float32)))
        ref = ref_topk(s, lt, ids, beta, 0.9, "tail", logmass=logmass)
        np.testing.assert_allclose(tail, ref, rtol=2e-4, atol=2e-5)
        assert (tail <= dense + 1e-5).all() and (tail >= prev - 1e-5).all()
        prev = tail
    assert (dense - prev).max() > 0 or beta in (0.0, 1.0)


def test_tail_teacher_mass_near_one_has_finite_grads():
    s, t, mask = make_case(9, extreme=False)
    lt, ids, _ = teacher_topk(t * 40, 1.0)  # the top-k hold nearly all the teacher mass
    logmass = jnp.zeros(mask.shape)  # mass exactly 1 as reported (rounded) by a server
    f = lambda x, lm: topk_jsd(x, lt, ids, mask, beta=0.0, teacher_logmass=lm)
    gs, gm = jax.grad(f, argnums=(0, 1))(jnp.asarray(s), logmass)
    assert np.isfinite(np.asarray(gs)).all() and np.isfinite(np.asarray(gm)).all()


# ---------------------------------------------------------------- gradients vs finite differences
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_grads_match_finite_differences(beta):
    from jax.test_util import check_grads
    s, t, mask = make_case(10, shape=(2, 3), vocab=11, extreme=False)
    lt, ids, lm = teacher_topk(t, 0.9, k=3)
    with jax.enable_x64(True):
        s64, t64 = jnp.asarray(s, jnp.float64), jnp.asarray(t, jnp.float64)
        lt64, lm64 = jnp.asarray(lt, jnp.float64), jnp.asarray(lm, jnp.float64)
        check_grads(jax.jit(lambda a, b: generalized_jsd(a, b, mask, beta=beta, temperature=0.9)), (s64, t64),
                    order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
        for mode in ("tail", "renormalize"):
            check_grads(jax.jit(lambda a, b, c: topk_jsd(a, b, ids, mask, beta=beta, temperature=0.9, mode=mode,
                                                         teacher_logmass=c)),
                        (s64, lt64, lm64 - 0.1), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- bad input
def test_bad_input_raises_naming_the_argument():
    s, t, mask = make_case(11, extreme=False)
    lt, ids, _ = teacher_topk(t, 1.0)
    cases = [
        (lambda: generalized_jsd(s, t[..., :-1], mask), ValueError, "teacher_logits"),
        (lambda: generalized_jsd(s, t, mask[:, :-1]), ValueError, "mask"),
        (lambda: generalized_jsd(s, t, mask, beta=1.5), ValueError, "beta"),
        (lambda: generalized_jsd(s, t, mask, beta=-0.1), ValueError, "beta"),
        (lambda: generalized_jsd(s, t, mask, temperature=0.0), ValueError, "temperature"),
        (lambda: generalized_jsd(s, t, mask, temperature=-1.0), ValueError, "temperature"),
        (lambda: generalized_jsd(s, t, mask, reduction="avg"), ValueError, "reduction"),
        (lambda: generalized_jsd(s, t, mask, beta=jnp.float32(0.5) + jnp.zeros(())), TypeError, "beta"),
        (lambda: topk_jsd(s, lt, ids + V, mask), ValueError, "teacher_ids"),
        (lambda: topk_jsd(s, lt, ids - 100, mask), ValueError, "teacher_ids"),
        (lambda: topk_jsd(s, lt[..., :-1], ids, mask), ValueError, "teacher_logprobs"),
        (lambda: topk_jsd(s, lt, ids.astype(np.float32), mask), TypeError, "teacher_ids"),
        (lambda: topk_jsd(s, lt, ids, mask, mode="dense"), ValueError, "mode"),
        (lambda: topk_jsd(s, lt, ids, mask, teacher_logmass=np.zeros(3)), ValueError, "teacher_logmass"),
        (lambda: topk_jsd(s, lt, ids, mask, beta=2.0), ValueError, "beta"),
    ]
    for fn, exc, name in cases:
        with pytest.raises(exc, match=name):
            fn()


def test_traced_out_of_range_ids_are_clamped():
    s, t, mask = make_case(12, extreme=False)
    lt, ids, _ = teacher_topk(t, 1.0)
    bad = ids.copy()
    bad[0, 0, 0] = V + 7
    f = jax.jit(lambda x, i: topk_jsd(x, lt, i, mask))
    clamped = bad.copy()
    clamped[0, 0, 0] = V - 1
    np.testing.assert_allclose(f(s, bad), f(s, clamped), rtol=1e-6)
    assert np.isfinite(np.asarray(jax.grad(lambda x: f(x, bad))(s))).all()

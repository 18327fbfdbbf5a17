"""OPD loss (sampled-token reverse KL as an advantage), truncated importance ratios, top-k diagnostics.

References are float64 NumPy written from the formulas (tests/jsd_reference's
log-softmax), not from gold_jax.losses.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gold_jax.losses import diagnostics as diag
from gold_jax.losses.opd import fused_opd, importance_weights, opd_loss
from tests.jsd_reference import np_log_softmax, np_lse


def _case(rng, b=2, r=5, v=9, vocab=7, k=3, temp=0.8):
    logits = rng.normal(size=(b, r, v)) * 2.0
    ids = rng.integers(0, vocab, size=(b, r))
    t_logits = rng.normal(size=(b, r, vocab)) * 2.0
    t_lp_full = np_log_softmax(t_logits / temp)
    t_ids = np.argsort(-t_lp_full, axis=-1)[..., :k]
    t_lp = np.take_along_axis(t_lp_full, t_ids, -1)
    t_tok = np.take_along_axis(t_lp_full, ids[..., None], -1)[..., 0]
    mask = (rng.random((b, r)) > 0.25).astype(np.float64)
    mask[0, 0] = 1.0
    return dict(logits=logits, ids=ids, t_lp=t_lp, t_ids=t_ids, t_logmass=np_lse(t_lp), t_tok=t_tok, mask=mask,
                vocab=vocab, temp=temp)


def _np_logq(logits, vocab, temp):
    return np_log_softmax(logits[..., :vocab] / temp)


def _np_opd(c, coef, behaviour=None, cap=None, outcome=None):
    """(loss, d loss / d logits) of the batchmean OPD surrogate."""
    logq = _np_logq(c["logits"], c["vocab"], c["temp"])
    lq = np.take_along_axis(logq, c["ids"][..., None], -1)[..., 0]
    w = np.ones_like(lq)
    if behaviour is not None:
        w = np.exp(lq - behaviour)
        if cap is not None:
            w = np.minimum(w, cap)
    rew = coef * (c["t_tok"] - lq) + (0.0 if outcome is None else outcome)
    n = c["mask"].sum()
    loss = (c["mask"] * -w * rew).sum() / n
    onehot = np.eye(c["vocab"])[c["ids"]]
    g = (c["mask"] * -w * rew)[..., None] * (onehot - np.exp(logq)) / c["temp"] / n
    grad = np.zeros_like(c["logits"])
    grad[..., :c["vocab"]] = g
    return loss, grad


@pytest.mark.parametrize("stale", [False, True])
def test_opd_value_and_grad_match_numpy(stale):
    rng = np.random.default_rng(0)
    c = _case(rng)
    behaviour = (np.take_along_axis(_np_logq(c["logits"], c["vocab"], c["temp"]), c["ids"][..., None], -1)[..., 0]
                 + rng.normal(size=c["ids"].shape)) if stale else None
    outcome = rng.normal(size=(2, 1))
    want_loss, want_grad = _np_opd(c, 0.7, behaviour, 1.5, outcome)
    with jax.enable_x64(True):
        f = lambda x: opd_loss(x, jnp.asarray(c["ids"]), jnp.asarray(c["t_tok"]), jnp.asarray(c["mask"]),  # noqa: E731
                               coef=0.7, temperature=c["temp"], vocab_size=c["vocab"], importance_cap=1.5,
                               behaviour_logprob=None if behaviour is None else jnp.asarray(behaviour),
                               outcome_reward=jnp.asarray(outcome))
        loss, grad = jax.value_and_grad(f)(jnp.asarray(c["logits"]))
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-9, atol=1e-12)
    if stale:  # the cap binds somewhere, so the test sees truncation
        lq = np.take_along_axis(_np_logq(c["logits"], c["vocab"], c["temp"]), c["ids"][..., None], -1)[..., 0]
        assert (np.exp(lq - behaviour) > 1.5).any() and (np.exp(lq - behaviour) < 1.5).any()


def _np_reverse_kl_grad(s, logp):
    """d KL(q||p) / d s for q = softmax(s): q_i (log q_i - log p_i - KL)."""
    logq = np_log_softmax(s)
    q = np.exp(logq)
    kl = (q * (logq - logp)).sum()
    return q * (logq - logp - kl)


def _np_forward_kl_grad(s, logp):
    return np.exp(np_log_softmax(s)) - np.exp(logp)


def _mc_grad(s, logp, y, behaviour_logq=None, cap=None):
    """Mean OPD gradient over the sampled tokens y, through opd_loss (float64)."""
    n = len(y)
    with jax.enable_x64(True):
        def f(theta):
            logits = jnp.broadcast_to(theta, (n, theta.shape[0]))
            beh = None if behaviour_logq is None else jnp.asarray(behaviour_logq[y])
            return opd_loss(logits, jnp.asarray(y), jnp.asarray(logp[y]), jnp.ones((n,)),
                            behaviour_logprob=beh, importance_cap=cap)
        return np.asarray(jax.grad(f)(jnp.asarray(s)))


def _per_sample_grads(s, logp, y, w):
    logq = np_log_softmax(s)
    return (-w * (logp[y] - logq[y]))[:, None] * (np.eye(len(s))[y] - np.exp(logq))


def test_opd_expected_gradient_is_reverse_kl_gradient():
    """λ = 1, no staleness: E_{y~q}[OPD gradient] = ∇ KL(q || p) (exactly by enumeration, and by Monte Carlo)."""
    rng = np.random.default_rng(1)
    v = 6
    s, logp = rng.normal(size=v), np_log_softmax(rng.normal(size=v) * 1.5)
    want = _np_reverse_kl_grad(s, logp)
    q = np.exp(np_log_softmax(s))
    # Exact expectation: every token once, weighted by q through the mask-free mean of q-weighted copies.
    exact = sum(q[y] * _mc_grad(s, logp, np.array([y])) for y in range(v))
    np.testing.assert_allclose(exact, want, rtol=1e-10, atol=1e-13)
    n = 200_000
    y = rng.choice(v, size=n, p=q)
    mc = _mc_grad(s, logp, y)
    se = _per_sample_grads(s, logp, y, 1.0).std(0) / np.sqrt(n)
    assert np.all(np.abs(mc - want) < 5 * se + 1e-12), (mc, want, se)
    # ... and the test can tell it apart from the forward KL's gradient.
    assert np.max(np.abs(mc - _np_forward_kl_grad(s, logp)) / (se + 1e-12)) > 20


def test_importance_ratio_corrects_a_stale_sample():
    """y ~ μ = q_{θ_old}: ratio-weighted OPD gradients average to ∇ KL(q_θ || p); unweighted ones do not."""
    rng = np.random.default_rng(2)
    v = 5
    s, logp = rng.normal(size=v), np_log_softmax(rng.normal(size=v) * 1.5)
    s_old = s + rng.normal(size=v) * 0.6
    log_mu = np_log_softmax(s_old)
    want = _np_reverse_kl_grad(s, logp)
    n = 200_000
    y = rng.choice(v, size=n, p=np.exp(log_mu))
    ratio = np.exp(np_log_softmax(s)[y] - log_mu[y])
    corrected = _mc_grad(s, logp, y, behaviour_logq=log_mu, cap=None)
    se = _per_sample_grads(s, logp, y, ratio).std(0) / np.sqrt(n)
    assert np.all(np.abs(corrected - want) < 5 * se + 1e-12), (corrected, want, se)
    stale = _mc_grad(s, logp, y)
    se_stale = _per_sample_grads(s, logp, y, 1.0).std(0) / np.sqrt(n)
    assert np.max(np.abs(stale - want) / (se_stale + 1e-12)) > 10
    # The cap: a truncated weight per sample, exactly min(ratio, c).
    capped = _mc_grad(s, logp, y[:64], behaviour_logq=log_mu, cap=1.2)
    np.testing.assert_allclose(capped, _per_sample_grads(s, logp, y[:64], np.minimum(ratio[:64], 1.2)).mean(0),
                               rtol=1e-9, atol=1e-13)
    assert (ratio[:64] > 1.2).any()


def test_importance_weights_cap_and_stop_gradient():
    lq = jnp.log(jnp.array([0.5, 0.2, 0.9, 1e-30]))
    lb = jnp.log(jnp.array([0.1, 0.4, 0.9, 1e-3]))
    w, ratio = importance_weights(lq, lb, cap=2.0)
    np.testing.assert_allclose(np.asarray(ratio)[:3], [5.0, 0.5, 1.0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(w), [2.0, 0.5, 1.0, 1e-27], rtol=1e-4)
    g = jax.grad(lambda x: jnp.sum(importance_weights(x, lb, cap=2.0)[0]))(lq)
    np.testing.assert_array_equal(np.asarray(g), 0.0)
    w_inf, _ = importance_weights(jnp.array([0.0]), jnp.array([-1e4]), cap=None)
    assert np.isfinite(np.asarray(w_inf)).all()


def _np_diagnostics(c, logmass=True):
    logq = _np_logq(c["logits"], c["vocab"], c["temp"])
    k = c["t_ids"].shape[-1]
    top_s = np.argsort(-c["logits"][..., :c["vocab"]], axis=-1, kind="stable")[..., :k]
    overlap = np.array([[len(set(a) & set(b)) / k for a, b in zip(ra, rb)] for ra, rb in zip(top_s, c["t_ids"])])
    return {
        "teacher/topk_mass": np.exp(c["t_logmass"]) if logmass else np.exp(c["t_lp"]).sum(-1),
        "student/mass_on_teacher_topk": np.take_along_axis(np.exp(logq), c["t_ids"], -1).sum(-1),
        "gold/topk_overlap": overlap,
        "teacher/sampled_token_logprob": c["t_tok"],
    }


@pytest.mark.parametrize("logmass", [True, False])
def test_diagnostics_match_numpy(logmass):
    rng = np.random.default_rng(3)
    c = _case(rng, b=3, r=4, v=12, vocab=10, k=4)
    want = _np_diagnostics(c, logmass)
    with jax.enable_x64(True):
        teacher = diag.TopkTeacher(jnp.asarray(c["t_lp"]), jnp.asarray(c["t_ids"]),
                                   jnp.asarray(c["t_logmass"]) if logmass else None)
        got = diag.token_diagnostics(jnp.asarray(c["logits"]), teacher, jnp.asarray(c["t_tok"]),
                                     temperature=c["temp"], vocab_size=c["vocab"])
        _, from_loss = opd_loss(jnp.asarray(c["logits"]), jnp.asarray(c["ids"]), jnp.asarray(c["t_tok"]),
                                jnp.asarray(c["mask"]), temperature=c["temp"], vocab_size=c["vocab"],
                                diagnostics=teacher)
    assert set(got) == set(diag.NAMES) == set(want)
    for name in diag.NAMES:
        np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-10, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(np.asarray(from_loss[name]), want[name], rtol=1e-10, atol=1e-12, err_msg=name)
    with jax.enable_x64(True):
        means = diag.diagnostic_means(diag.diagnostic_sums(got, jnp.asarray(c["mask"])))
    for name in diag.NAMES:
        ref = (want[name] * c["mask"]).sum() / c["mask"].sum()
        np.testing.assert_allclose(float(means[name]), ref, rtol=1e-6, err_msg=name)
    # A padding column with the largest logit never enters the student's top-k.
    padded = c["logits"].copy()
    padded[..., c["vocab"]:] = 1e3
    with jax.enable_x64(True):
        got_pad = diag.token_diagnostics(jnp.asarray(padded), teacher, temperature=c["temp"], vocab_size=c["vocab"])
    np.testing.assert_allclose(np.asarray(got_pad["gold/topk_overlap"]), want["gold/topk_overlap"])


def test_fused_opd_matches_materialised():
    """Values, gradients (hidden and lm head) and diagnostics of the chunked form equal the materialised one."""
    rng = np.random.default_rng(4)
    b, r, h, v, vocab, k = 2, 7, 8, 13, 11, 3
    hidden = rng.normal(size=(b, r, h))
    w = rng.normal(size=(h, v)) * 0.7
    logits = hidden @ w
    c = _case(rng, b=b, r=r, v=v, vocab=vocab, k=k)
    c["logits"] = logits
    behaviour = rng.normal(size=(b, r)) - 2.0
    with jax.enable_x64(True):
        teacher = diag.TopkTeacher(jnp.asarray(c["t_lp"]), jnp.asarray(c["t_ids"]), jnp.asarray(c["t_logmass"]))
        kw = dict(coef=0.5, temperature=c["temp"], vocab_size=vocab, behaviour_logprob=jnp.asarray(behaviour),
                  importance_cap=2.0)
        args = (jnp.asarray(c["ids"]), jnp.asarray(c["t_tok"]), jnp.asarray(c["mask"]))

        def mat(hd, wt):
            return opd_loss(hd @ wt, *args, diagnostics=teacher, **kw)

        def fus(hd, wt):
            return fused_opd(hd, wt, *args, chunk_size=4, diagnostics=teacher, **kw)

        (l_m, d_m), g_m = jax.value_and_grad(mat, argnums=(0, 1), has_aux=True)(jnp.asarray(hidden), jnp.asarray(w))
        (l_f, d_f), g_f = jax.value_and_grad(fus, argnums=(0, 1), has_aux=True)(jnp.asarray(hidden), jnp.asarray(w))
    np.testing.assert_allclose(float(l_f), float(l_m), rtol=1e-12)
    for a, bb in zip(g_f, g_m):
        np.testing.assert_allclose(np.asarray(a), np.asarray(bb), rtol=1e-10, atol=1e-13)
    want = _np_diagnostics(c)
    for name in diag.NAMES:
        np.testing.assert_allclose(np.asarray(d_f[name]), want[name], rtol=1e-10, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(np.asarray(d_m[name]), want[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_fused_opd_jits_in_float32():
    rng = np.random.default_rng(5)
    hidden = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 16, size=(3, 5)))
    t_tok = jnp.asarray(rng.normal(size=(3, 5)) - 3.0, jnp.float32)
    mask = jnp.ones((3, 5))
    f = jax.jit(jax.grad(lambda hd, wt: fused_opd(hd, wt, ids, t_tok, mask, chunk_size=6), argnums=(0, 1)))
    g = jax.grad(lambda hd, wt: opd_loss(hd @ wt, ids, t_tok, mask), argnums=(0, 1))(hidden, w)
    for a, b in zip(f(hidden, w), g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


def test_bad_inputs_name_the_problem():
    x = jnp.zeros((2, 3, 5))
    ids, t, m = jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3)), jnp.ones((2, 3))
    with pytest.raises(ValueError, match="teacher_token_logprob"):
        opd_loss(x, ids, jnp.zeros((2, 4)), m)
    with pytest.raises(ValueError, match="behaviour_logprob"):
        opd_loss(x, ids, t, m, behaviour_logprob=jnp.zeros((3,)))
    with pytest.raises(ValueError, match="importance_cap"):
        opd_loss(x, ids, t, m, behaviour_logprob=t, importance_cap=0.0)
    with pytest.raises(ValueError, match="opd_coef"):
        opd_loss(x, ids, t, m, coef=float("nan"))
    with pytest.raises(ValueError, match="outcome_reward"):
        opd_loss(x, ids, t, m, outcome_reward=jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match="lm_head"):
        fused_opd(jnp.zeros((2, 3, 4)), jnp.zeros((5, 5)), ids, t, m)

"""Sampling math against a float64 NumPy reference, and a chi-square frequency test."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from gold_jax.rollout.sampling import is_eos, sample_tokens, truncated_logprobs


def ref_logprobs(logits: np.ndarray, t: float, top_p: float, top_k: int) -> np.ndarray:
    """Independent float64 reference: HF order (temperature, top-k, then top-p)."""
    x = logits.astype(np.float64) / (t if t > 0 else 1.0)
    out = np.full_like(x, -np.inf)
    for b in range(x.shape[0]):
        order = np.argsort(-x[b], kind="stable")
        k = len(order) if top_k <= 0 else min(top_k, len(order))
        cand = order[:k]
        p = np.exp(x[b, cand] - x[b, cand].max())
        p /= p.sum()
        keep, mass = [], 0.0
        for idx, pi in zip(cand, p):
            if keep and mass >= top_p:
                break
            keep.append(idx)
            mass += pi
        kept = x[b, keep]
        out[b, keep] = kept - (kept.max() + np.log(np.exp(kept - kept.max()).sum()))
    return out


@pytest.mark.parametrize("t,top_p,top_k", [(1.0, 1.0, 0), (0.7, 1.0, 0), (1.3, 0.8, 0),
                                           (1.0, 1.0, 5), (0.9, 0.5, 7), (0.0, 0.9, 0),
                                           (2.0, 0.95, 40)])
def test_truncated_logprobs_match_reference(t, top_p, top_k):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((6, 37)) * 3).astype(np.float32)
    got = np.asarray(truncated_logprobs(jnp.asarray(logits), t, top_p, top_k))
    want = ref_logprobs(logits, t, top_p, top_k)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-5, atol=1e-5)
    if top_k:
        assert (np.isfinite(got).sum(1) <= top_k).all()


@pytest.mark.parametrize("scale,t,top_p,top_k", [
    (8.0, 1.0, 0.9, 0),    # peaked: the prefix lies within the top_k candidates (fast path)
    (0.05, 1.0, 0.9, 0),   # flat: the top-p prefix runs past them (bisection)
    (0.05, 1.5, 0.7, 200),  # k beyond the candidates, then top-p (bisection for both)
    (0.05, 1.0, 1.0, 100),  # top-k only, beyond the candidates
    (8.0, 0.5, 0.95, 10),
])
def test_truncation_both_paths_match_reference(scale, t, top_p, top_k):
    """V=300 > CANDIDATES, so both the lax.top_k fast path and the bisection are exercised."""
    from gold_jax.rollout.sampling import CANDIDATES
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((4, 300)) * scale).astype(np.float32)
    logits[0, :5] = -np.inf  # masked vocabulary entries (e.g. padding ids) stay excluded
    got = np.asarray(truncated_logprobs(jnp.asarray(logits), t, top_p, top_k))
    want = ref_logprobs(logits, t, top_p, top_k)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-5, atol=1e-5)
    kept = np.isfinite(want).sum(1)
    if scale < 1:
        assert (kept > CANDIDATES).all(), "test must reach the bisection path"


def test_traced_params_do_not_recompile():
    f = jax.jit(truncated_logprobs)
    x = jnp.ones((2, 11))
    for t, p, k in [(0.5, 0.9, 3), (1.5, 0.3, 0), (0.0, 1.0, 11)]:
        f(x, jnp.float32(t), jnp.float32(p), jnp.int32(k))
    assert f._cache_size() == 1


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    n = counts.sum()
    exp = probs * n
    big = exp >= 5  # pool rare outcomes so the chi-square approximation holds
    obs = np.append(counts[big], counts[~big].sum())
    ex = np.append(exp[big], exp[~big].sum())
    if ex[-1] == 0:
        obs, ex = obs[:-1], ex[:-1]
    chi2 = ((obs - ex) ** 2 / ex).sum()
    return float(stats.chi2.sf(chi2, df=len(ex) - 1))


@pytest.mark.parametrize("t,top_p,top_k", [(0.8, 1.0, 0), (1.0, 0.7, 0), (1.2, 1.0, 4)])
def test_sample_frequencies_chi_square(t, top_p, top_k):
    rng = np.random.default_rng(1)
    v, n = 12, 8192
    logits = rng.standard_normal(v).astype(np.float32) * 2
    batch = jnp.broadcast_to(jnp.asarray(logits), (n, v))
    tok, lp = jax.jit(sample_tokens)(jax.random.key(3), batch, t, top_p, top_k)
    tok, lp = np.asarray(tok), np.asarray(lp)
    ref = np.exp(ref_logprobs(logits[None], t, top_p, top_k)[0])
    counts = np.bincount(tok, minlength=v)
    assert counts[ref == 0].sum() == 0, "a truncated token was sampled"
    assert _chi2_pvalue(counts[ref > 0], ref[ref > 0]) > 1e-3
    np.testing.assert_allclose(lp, np.log(ref[tok]), rtol=1e-5, atol=1e-5)
    # Same key, same samples.
    tok2, _ = jax.jit(sample_tokens)(jax.random.key(3), batch, t, top_p, top_k)
    np.testing.assert_array_equal(tok, np.asarray(tok2))


def test_greedy_picks_argmax_with_unscaled_logprob():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((5, 9)).astype(np.float32)
    tok, lp = sample_tokens(jax.random.key(0), jnp.asarray(logits), 0.0, 0.5, 3)
    np.testing.assert_array_equal(np.asarray(tok), logits.argmax(1))
    x = logits.astype(np.float64)
    ls = x - np.log(np.exp(x).sum(1, keepdims=True))
    np.testing.assert_allclose(np.asarray(lp), ls[np.arange(5), logits.argmax(1)], rtol=1e-5)


def test_first_argmax_ties_and_values():
    from gold_jax.rollout.sampling import first_argmax
    x = np.array([[1.0, 3.0, 3.0, 0.0], [-np.inf, -1.0, -np.inf, -1.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), [1, 1, 0])
    rng = np.random.default_rng(6)
    y = rng.standard_normal((7, 301)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(y))), y.argmax(-1))


def test_is_eos_multiple_ids():
    got = np.asarray(is_eos(jnp.array([1, 2, 3, 4], jnp.int32), (2, 4)))
    np.testing.assert_array_equal(got, [False, True, False, True])


def test_end_at_eos_cuts_each_row_at_its_first_id_of_the_set():
    """Issue 12.2: a completion from another model (seq_kd teacher) ends at the student's first EOS id."""
    from gold_jax.rollout.base import end_at_eos
    rng = np.random.default_rng(3)
    eos, pad = (7, 8, 9), 0      # Llama 3.2 Instruct-style: [end_of_text, eom, eot]
    ids = rng.integers(1, 12, size=(64, 10)).astype(np.int32)
    lengths = rng.integers(0, 11, size=64)
    mask = (np.arange(10)[None] < lengths[:, None]).astype(np.int32)
    got_ids, got_mask = end_at_eos(ids, mask, eos, pad)
    for b in range(64):
        n = int(lengths[b])
        hits = [j for j in range(n) if ids[b, j] in eos]
        keep = hits[0] + 1 if hits else n
        assert got_mask[b].tolist() == [1] * keep + [0] * (10 - keep)
        assert got_ids[b].tolist() == ids[b, :keep].tolist() + [pad] * (10 - keep)

"""Independent float64 NumPy reference for the generalized JSD losses, and random test cases.

Written from the formulas, not from gold_jax.losses: a plain log-softmax, the
JSD sum with explicit 0 log 0 = 0, and the top-k tail bucket built from the
set difference of ids. Shared by tests/test_losses*.py.
"""
import numpy as np

from gold_jax.losses.core import LOGMASS_MAX


def np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_lse(x, axis=-1):
    m = x.max(axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis, keepdims=True))).squeeze(axis)


def np_jsd(logp, logq, beta, valid=None):
    """Sum over the last axis of beta KL(P||M) + (1-beta) KL(Q||M), M = beta P + (1-beta) Q."""
    p, q = np.exp(logp), np.exp(logq)
    with np.errstate(divide="ignore", invalid="ignore"):
        if beta == 0:
            t = np.where(p > 0, p * (logp - logq), 0.0)
        elif beta == 1:
            t = np.where(q > 0, q * (logq - logp), 0.0)
        else:
            logm = np.log(beta * p + (1 - beta) * q)
            t = (np.where(p > 0, beta * p * (logp - logm), 0.0)
                 + np.where(q > 0, (1 - beta) * q * (logq - logm), 0.0))
    if valid is not None:
        t = np.where(valid, t, 0.0)
    return t.sum(-1)


def ref_dense(s, t, beta, temp, vocab_size=None):
    """Per-token JSD; columns >= vocab_size (embedding padding) are dropped."""
    s, t = np.asarray(s, np.float64)[..., :vocab_size] / temp, np.asarray(t, np.float64)[..., :vocab_size] / temp
    return np_jsd(np_log_softmax(t), np_log_softmax(s), beta)


def ref_topk(s, lt, ids, beta, temp, mode, logmass=None, vocab_size=None):
    """Per-token top-k JSD ("tail" or "renormalize"); columns >= vocab_size are dropped."""
    s, lt = np.asarray(s, np.float64)[..., :vocab_size] / temp, np.asarray(lt, np.float64)
    logq_all = np_log_softmax(s)
    logq_k = np.take_along_axis(logq_all, ids, -1)
    if mode == "renormalize":
        return np_jsd(lt - np_lse(lt)[..., None], logq_k - np_lse(logq_k)[..., None], beta)
    out = np.zeros(s.shape[:-1])
    for idx in np.ndindex(*s.shape[:-1]):
        rest = np.setdiff1d(np.arange(s.shape[-1]), ids[idx])
        lm = np_lse(lt[idx]) if logmass is None else float(logmass[idx])
        lp_tail = np.log(-np.expm1(min(lm, LOGMASS_MAX)))
        head = np_jsd(lt[idx], logq_k[idx], beta)
        tail = np_jsd(np.array([lp_tail]), np.array([np_lse(logq_all[idx][rest])]), beta) if rest.size else 0.0
        out[idx] = head + tail
    return out


def make_case(seed, shape=(3, 4), vocab=37, scale=3.0, extreme=True):
    """(student, teacher, mask): extreme +-1e4 logits at tokens [0, 0] and [0, 1], last row fully masked."""
    r = np.random.default_rng(seed)
    s = r.normal(size=shape + (vocab,)) * scale
    t = r.normal(size=shape + (vocab,)) * scale
    if extreme:  # one token with +-1e4 logits in both models
        s[0, 0] = r.choice([-1e4, 1e4, 0.0], size=vocab)
        t[0, 0] = r.choice([-1e4, 1e4, 0.0], size=vocab)
        s[0, 1, :3] = [1e4, -1e4, 5e3]
    mask = (r.random(shape) < 0.7).astype(np.int32)
    mask[0, 0] = mask[0, 1] = 1
    mask[-1] = 0  # a row with no kept token
    return s.astype(np.float32), t.astype(np.float32), mask


def teacher_topk(t, temp, k=5, vocab_size=None):
    """Teacher top-k at temperature temp: (log-probs f32, ids i32, exact log-mass f64)."""
    lt = np_log_softmax(np.asarray(t, np.float64)[..., :vocab_size] / temp)
    ids = np.argsort(-lt, -1, kind="stable")[..., :k].astype(np.int32)
    return np.take_along_axis(lt, ids, -1).astype(np.float32), ids, np_lse(np.take_along_axis(lt, ids, -1))

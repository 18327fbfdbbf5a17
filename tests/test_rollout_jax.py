"""JaxSampler: greedy == argmax of full forwards, EOS/masks, chi-square, sharding, weight sync."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from gold_jax.models import ModelConfig, init_model
from gold_jax.rollout import make_engine
from gold_jax.rollout.base import RolloutEngine
from gold_jax.rollout.jax_sampler import JaxSampler
from gold_jax.types import FINISH_EOS, FINISH_LENGTH

V, PAD, R = 300, 0, 6
CFG = ModelConfig(architecture="llama", vocab_size=V, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
NO_EOS = V - 1  # id the random model never picks greedily in these prompts (checked below)


def make_model(seed: int, cfg: ModelConfig = CFG):
    """Random model with a sharpened head: N(0, 0.02) init gives near-uniform logits,
    which would make the chi-square test blind to the temperature."""
    m = init_model(cfg, seed=seed)
    m.lm_head[...] = m.lm_head[...] * 20.0
    return m


def prompts():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, V - 1, size=(4, 8)).astype(np.int32)
    mask = np.ones_like(ids)
    for row, n_pad in enumerate([0, 3, 5, 1]):
        mask[row, :n_pad] = 0
        ids[row, :n_pad] = PAD
    return ids, mask


@pytest.fixture(scope="module")
def model():
    return make_model(0)


@pytest.fixture(scope="module")
def sampler(model):
    return JaxSampler(model, eos_id=NO_EOS, pad_id=PAD)


@pytest.fixture(scope="module")
def full_forward(model):
    return jax.jit(lambda ids, m: model(ids, m))


def reference_greedy(full_forward, ids, mask, r, eos_ids):
    """Step-by-step argmax with full forwards (no cache) over a fixed [B, P + R] buffer."""
    b, p = ids.shape
    buf = np.concatenate([ids, np.full((b, r), PAD, np.int32)], 1)
    att = np.concatenate([mask, np.zeros((b, r), np.int32)], 1)
    out, lps, cm = np.full((b, r), PAD), np.zeros((b, r)), np.zeros((b, r), np.int32)
    done = np.zeros(b, bool)
    for j in range(r):
        logits = np.asarray(full_forward(jnp.asarray(buf), jnp.asarray(att)), np.float64)[:, p - 1 + j]
        tok = logits.argmax(-1)
        ls = logits - logits.max(-1, keepdims=True)
        ls -= np.log(np.exp(ls).sum(-1, keepdims=True))
        live = ~done
        out[live, j], lps[live, j], cm[live, j] = tok[live], ls[live, tok[live]], 1
        buf[:, p + j], att[:, p + j] = tok, 1
        done |= np.isin(tok, eos_ids)
    return out, cm, lps


def test_protocol_and_factory(model):
    eng = make_engine("jax", model, eos_id=1, pad_id=PAD)
    assert isinstance(eng, JaxSampler) and isinstance(eng, RolloutEngine)
    with pytest.raises(ValueError, match="kind"):
        make_engine("tpu-magic", model, eos_id=1, pad_id=PAD)


def test_greedy_equals_full_forward_argmax(sampler, full_forward):
    ids, mask = prompts()
    res = sampler.generate(ids, mask, max_new_tokens=R, temperature=0.0, seed=0)
    want_ids, want_mask, want_lp = reference_greedy(full_forward, ids, mask, R, (NO_EOS,))
    assert not (want_ids == NO_EOS).any()
    np.testing.assert_array_equal(res.completion_ids, want_ids)
    np.testing.assert_array_equal(res.completion_mask, want_mask)
    np.testing.assert_allclose(res.logprobs, want_lp, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(res.finish_reason, FINISH_LENGTH)
    np.testing.assert_array_equal(res.prompt_ids, ids)
    assert res.completion_ids.shape == (4, R) and res.completion_ids.dtype == np.int32


def test_eos_stops_per_sequence(model, sampler, full_forward):
    ids, mask = prompts()
    base = sampler.generate(ids, mask, max_new_tokens=R, temperature=0.0, seed=0).completion_ids
    # EOS = the token row 0 emits at step 2 and row 1 at step 1 (two ids: a list of EOS works).
    eos = (int(base[0, 2]), int(base[1, 1]))
    eng = JaxSampler(model, eos_id=list(eos), pad_id=PAD)
    res = eng.generate(ids, mask, max_new_tokens=R, temperature=0.0, seed=0)
    want_ids, want_mask, want_lp = reference_greedy(full_forward, ids, mask, R, eos)
    np.testing.assert_array_equal(res.completion_mask, want_mask)
    np.testing.assert_array_equal(res.completion_ids, np.where(want_mask == 1, want_ids, PAD))
    np.testing.assert_allclose(res.logprobs, want_lp, rtol=1e-4, atol=1e-4)
    lengths = res.completion_mask.sum(1)
    for row in range(4):
        hits = np.nonzero(np.isin(base[row], eos))[0]
        if len(hits):  # mask is 1 up to and including the first EOS, then 0
            assert lengths[row] == hits[0] + 1 and res.finish_reason[row] == FINISH_EOS
            assert (res.completion_ids[row, hits[0] + 1:] == PAD).all()
        else:
            assert lengths[row] == R and res.finish_reason[row] == FINISH_LENGTH
    assert lengths[0] <= 3 and lengths[1] <= 2
    assert (res.logprobs[res.completion_mask == 0] == 0).all()


def test_first_token_chi_square_and_logprobs(model, sampler, full_forward):
    ids, mask = prompts()
    ids, mask = ids[1:2], mask[1:2]
    t, top_k, n = 0.8, 40, 4096
    res = sampler.generate(ids, mask, n=n, max_new_tokens=1, temperature=t, top_k=top_k, seed=7)
    logits = np.asarray(full_forward(jnp.asarray(ids), jnp.asarray(mask)), np.float64)[0, -1] / t
    keep = logits >= np.sort(logits)[-top_k]
    probs = np.where(keep, np.exp(logits - logits.max()), 0.0)
    probs /= probs.sum()
    tok = res.completion_ids[:, 0]
    counts = np.bincount(tok, minlength=V)
    assert counts[~keep].sum() == 0, "top-k: a truncated token was sampled"
    exp = probs[keep] * n
    big = exp >= 5
    obs, ex = counts[keep][big], exp[big]
    if (~big).any():  # pool rare outcomes so the chi-square approximation holds
        obs, ex = np.append(obs, counts[keep][~big].sum()), np.append(ex, exp[~big].sum())
    chi2 = ((obs - ex) ** 2 / ex).sum()
    assert stats.chi2.sf(chi2, len(ex) - 1) > 1e-3
    np.testing.assert_allclose(res.logprobs[:, 0], np.log(probs[tok]), rtol=1e-4, atol=1e-4)
    assert res.prompt_ids.shape == (n, 8)


def test_sampling_reproducible_and_n_layout(sampler):
    ids, mask = prompts()
    kw = dict(n=3, max_new_tokens=R, temperature=1.0, top_p=0.9, seed=11)
    a = sampler.generate(ids, mask, **kw)
    b = sampler.generate(ids, mask, **kw)
    c = sampler.generate(ids, mask, **{**kw, "seed": 12})
    np.testing.assert_array_equal(a.completion_ids, b.completion_ids)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (a.completion_ids != c.completion_ids).any()
    np.testing.assert_array_equal(a.prompt_ids, np.repeat(ids, 3, 0))
    np.testing.assert_array_equal(a.prompt_mask, np.repeat(mask, 3, 0))
    assert len({tuple(r) for r in a.completion_ids[:3]}) > 1  # samples of one prompt differ
    assert (a.logprobs <= 0).all() and (a.logprobs[a.completion_mask == 1] < 0).any()


def test_rows_sample_the_same_whichever_process_draws_them(sampler):
    """Per-host rollout: prompts 2..3 sampled alone with row_offset=2 (as process 1 of 2 would) give the
    tokens of rows 2..3 of the whole batch; without the offset they would not."""
    ids, mask = prompts()
    kw = dict(n=3, max_new_tokens=R, temperature=1.0, top_p=0.9, seed=11)
    whole = sampler.generate(ids, mask, **kw)
    first = sampler.generate(ids[:2], mask[:2], **kw)
    second = sampler.generate(ids[2:], mask[2:], row_offset=2, **kw)
    for k in ("completion_ids", "completion_mask"):
        np.testing.assert_array_equal(np.concatenate([getattr(first, k), getattr(second, k)]), getattr(whole, k))
    # batch size may change the float32 summation order of the forward, not the tokens here
    np.testing.assert_allclose(np.concatenate([first.logprobs, second.logprobs]), whole.logprobs, rtol=1e-5,
                               atol=1e-6)
    unshifted = sampler.generate(ids[2:], mask[2:], **kw)
    assert (unshifted.completion_ids != second.completion_ids).any()


def test_sampling_params_do_not_recompile(model):
    """T, top-p, top-k and the seed are traced; prompt lengths share a bucket."""
    eng = JaxSampler(model, eos_id=NO_EOS, pad_id=PAD, max_prompt_buckets=1, prompt_bucket=16)
    ids, mask = prompts()
    for t, tp, tk, s in [(0.0, 1.0, 0, 0), (1.0, 0.5, 0, 1), (0.7, 1.0, 5, 2)]:
        eng.generate(ids, mask, max_new_tokens=R, temperature=t, top_p=tp, top_k=tk, seed=s)
    eng.generate(ids[:, 1:], mask[:, 1:], max_new_tokens=R, temperature=0.0, seed=0)  # 7 -> 16
    assert eng._run._cache_size() == 1 and eng.compiled_shapes == {(4, 16, R)}
    long_ids = np.concatenate([ids, ids, ids], 1)  # 24 columns: the next bucket
    with pytest.raises(ValueError, match="max_prompt_buckets"):
        eng.generate(long_ids, np.ones_like(long_ids), max_new_tokens=R, temperature=0.0, seed=0)


def test_prompt_bucket_padding_changes_nothing(model, sampler):
    """Extra left padding (bucketing) gives the same tokens and log-probs, greedy and sampled."""
    ids, mask = prompts()
    exact = JaxSampler(model, eos_id=NO_EOS, pad_id=PAD, prompt_bucket=1)
    for kw in (dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, top_k=50, n=2)):
        a = exact.generate(ids, mask, max_new_tokens=R, seed=3, **kw)
        b = sampler.generate(ids, mask, max_new_tokens=R, seed=3, **kw)  # bucket 16
        np.testing.assert_array_equal(a.completion_ids, b.completion_ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(b.prompt_ids, np.repeat(ids, kw.get("n", 1), 0))
    assert exact.compiled_shapes == {(4, 8, R), (8, 8, R)}
    with pytest.raises(ValueError, match="prompt_bucket"):
        JaxSampler(model, eos_id=NO_EOS, pad_id=PAD, prompt_bucket=0)


@pytest.mark.parametrize("bad,match", [
    (dict(prompt_mask=np.zeros((4, 8), np.int32)), "no prompt token"),
    (dict(prompt_mask=np.tile([1, 0], (4, 4))), "left-padded"),
    (dict(prompt_ids=np.full((4, 8), V + 3, np.int32)), "prompt_ids"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(n=0), "n must"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_requests(sampler, bad, match):
    ids, mask = prompts()
    kw = dict(prompt_ids=ids, prompt_mask=mask, max_new_tokens=R, temperature=1.0, seed=0)
    with pytest.raises(ValueError, match=match):
        sampler.generate(**{**kw, **bad})


def test_sync_weights_unsharded(sampler, model):
    ids, mask = prompts()
    other = make_model(1)
    eng = JaxSampler(make_model(0), eos_id=NO_EOS, pad_id=PAD)
    want = JaxSampler(other, eos_id=NO_EOS, pad_id=PAD).generate(
        ids, mask, max_new_tokens=R, temperature=0.0, seed=0)
    before = eng.generate(ids, mask, max_new_tokens=R, temperature=0.0, seed=0)
    assert (before.completion_ids != want.completion_ids).any()
    dt = eng.sync_weights(other)
    assert isinstance(dt, float) and dt >= 0
    got = eng.generate(ids, mask, max_new_tokens=R, temperature=0.0, seed=0)
    np.testing.assert_array_equal(got.completion_ids, want.completion_ids)
    with pytest.raises(TypeError):
        eng.sync_weights({"not": "a state"})
    with pytest.raises(ValueError, match="sync_weights"):
        eng.sync_weights(make_model(0, CFG.replace(num_layers=1)))


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 2, 2)])
def test_sharded_matches_unsharded(devices, model, sampler, shape):
    from gold_jax.sharding import make_mesh
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), devices)
    eng = JaxSampler(model, eos_id=NO_EOS, pad_id=PAD, mesh=mesh)
    ids, mask = prompts()
    for rows, kw in ((4, dict(temperature=0.0)), (3, dict(temperature=1.0, top_p=0.9, n=3))):
        # 3 prompts x n=3 = 9 rows: not a multiple of data*fsdp=4 on (2,2,2), so the
        # batch is padded to 12 there; the padding must not change any row's samples.
        want = sampler.generate(ids[:rows], mask[:rows], max_new_tokens=R, seed=5, **kw)
        got = eng.generate(ids[:rows], mask[:rows], max_new_tokens=R, seed=5, **kw)
        np.testing.assert_array_equal(got.completion_ids, want.completion_ids)
        np.testing.assert_array_equal(got.completion_mask, want.completion_mask)
        np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-4, atol=1e-4)
    leaf = jax.tree.leaves(eng._state)[0]
    assert leaf.sharding.mesh == mesh


def test_sync_weights_across_device_subsets(devices):
    """Trainer params sharded on devices[:4] are resharded onto the rollout mesh on devices[4:]."""
    from gold_jax.models.partition import shard_model
    from gold_jax.sharding import make_mesh
    train_mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices[:4])
    roll_mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, devices[4:])
    eng = JaxSampler(make_model(0), eos_id=NO_EOS, pad_id=PAD, mesh=roll_mesh)
    student = shard_model(make_model(1), train_mesh)
    ids, mask = prompts()
    want = JaxSampler(make_model(1), eos_id=NO_EOS, pad_id=PAD).generate(
        ids, mask, max_new_tokens=R, temperature=0.0, seed=0)
    eng.sync_weights(nnx_state(student))
    for leaf in jax.tree.leaves(eng._state):
        assert leaf.sharding.device_set == set(devices[4:])
    got = eng.generate(ids, mask, max_new_tokens=R, temperature=0.0, seed=0)
    np.testing.assert_array_equal(got.completion_ids, want.completion_ids)


def nnx_state(model):
    from flax import nnx
    return nnx.state(model)


def test_stops_on_every_id_of_a_shipped_eos_set(model, sampler, tmp_path):
    """Issue 12.2: generation_config.json's eos list (not just the tokenizer's eos_token) stops sampling."""
    import json

    from shipped_tokenizers import build_llama3

    from gold_jax.data import load_tokenizer
    from gold_jax.data.special_tokens import eos_token_ids
    ids, mask = prompts()
    base = sampler.generate(ids, mask, max_new_tokens=R, temperature=0.0, seed=0).completion_ids
    x, y = int(base[0, 1]), int(base[2, 3])   # ids this model emits; the tokenizer's <|eot_id|> it never does
    folder = build_llama3(str(tmp_path / "tok"))
    for name in ("generation_config.json", "config.json"):
        with open(f"{folder}/{name}", "w") as f:
            json.dump({"eos_token_id": [x, y]}, f)
    eos = eos_token_ids(load_tokenizer(folder))
    assert eos[1:] == (x, y) and eos[0] >= V
    res = make_engine("jax", model, eos_id=eos, pad_id=PAD).generate(ids, mask, max_new_tokens=R,
                                                                     temperature=0.0, seed=0)
    for row in range(4):
        hits = np.nonzero(np.isin(base[row], (x, y)))[0]
        want = hits[0] + 1 if len(hits) else R
        assert res.completion_mask[row].sum() == want
        np.testing.assert_array_equal(res.completion_ids[row, :want], base[row, :want])
    assert res.completion_mask[0].sum() <= 2 and res.finish_reason[0] == FINISH_EOS

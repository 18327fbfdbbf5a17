"""prune.py: a width-pruned decoder computes the original with the removed heads and neurons zeroed."""
from __future__ import annotations

import numpy as np
import pytest

from flax import nnx

from gold_jax.demo import build, prune
from gold_jax.models import ModelConfig, init_model


@nnx.jit
def _logits(model, ids, mask):
    return model(ids, mask)


@pytest.fixture(scope="module")
def model_and_batch():
    cfg = ModelConfig("qwen3", vocab_size=40, hidden_size=32, intermediate_size=24, num_layers=2, num_heads=4,
                      num_kv_heads=4, head_dim=8, qk_norm=True, tie_word_embeddings=True,
                      max_position_embeddings=32)
    m = init_model(cfg, seed=3)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 40, (3, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :3] = 0                                  # left padding is ignored by the scores
    return m, ids, mask


def _zeroed(model, keep_heads, keep_neurons):
    """The original model with every other head's o_proj rows and neuron's down_proj rows set to zero."""
    z = init_model(model.config, seed=3)
    for lz, heads, neurons in zip(z.layers, keep_heads, keep_neurons):
        o = np.array(lz.self_attn.o_proj[...])
        o[[h for h in range(o.shape[0]) if h not in heads]] = 0
        lz.self_attn.o_proj[...] = o
        d = np.array(lz.mlp.down_proj[...])
        d[[n for n in range(d.shape[0]) if n not in neurons]] = 0
        lz.mlp.down_proj[...] = d
    return z


def test_pruned_model_equals_the_zeroed_original(model_and_batch):
    m, ids, mask = model_and_batch
    scores = prune.importance(m, ids, mask)
    assert [s["heads"].shape for s in scores] == [(4,), (4,)] and all(s["neurons"].shape == (24,) for s in scores)
    assert all(np.all(s["heads"] > 0) and np.all(s["neurons"] > 0) for s in scores)
    small = prune.prune(m, scores, num_heads=2, intermediate=10)
    assert small.config.num_heads == small.config.num_kv_heads == 2 and small.config.intermediate_size == 10
    assert build._n_params(small) < build._n_params(m)
    heads = [set(np.argsort(-s["heads"])[:2]) for s in scores]
    neurons = [set(np.argsort(-s["neurons"])[:10]) for s in scores]
    want = np.asarray(_logits(_zeroed(m, heads, neurons), ids, mask), np.float64)
    got = np.asarray(_logits(small, ids, mask), np.float64)
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=1e-5)
    full = prune.prune(m, scores, num_heads=4, intermediate=24)   # keeping everything: the same function
    np.testing.assert_allclose(np.asarray(_logits(full, ids, mask))[mask == 1],
                               np.asarray(_logits(m, ids, mask))[mask == 1],
                               atol=1e-5)


def test_a_silenced_head_and_neuron_score_zero(model_and_batch):
    m, ids, mask = model_and_batch
    z = _zeroed(m, [{0, 1, 3}, {1, 2, 3}], [set(range(24)) - {5}, set(range(24)) - {17}])
    s = prune.importance(z, ids, mask)
    for layer, head, neuron in ((0, 2, 5), (1, 0, 17)):
        assert s[layer]["heads"][head] == 0 and np.sum(s[layer]["heads"] == 0) == 1
        assert s[layer]["neurons"][neuron] == 0 and np.sum(s[layer]["neurons"] == 0) == 1
    small = prune.prune(z, s, num_heads=3, intermediate=23)       # the silenced ones are the ones removed
    np.testing.assert_allclose(np.asarray(_logits(small, ids, mask))[mask == 1],
                               np.asarray(_logits(z, ids, mask))[mask == 1],
                               atol=1e-5)


def test_bad_prune_arguments(model_and_batch):
    m, ids, mask = model_and_batch
    scores = prune.importance(m, ids, mask)
    with pytest.raises(ValueError, match="num_heads=5"):
        prune.prune(m, scores, num_heads=5, intermediate=4)
    with pytest.raises(ValueError, match="1 layers of scores"):
        prune.prune(m, scores[:1], num_heads=2, intermediate=4)

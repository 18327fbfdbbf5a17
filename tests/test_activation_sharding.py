"""sharding/activations.py: the decoder's activation constraints pin the layout, never the values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from gold_jax.models import ModelConfig, init_model
from gold_jax.models.partition import shard_model, state_shardings
from gold_jax.sharding import make_mesh
from gold_jax.sharding.activations import activation_mesh, activation_rules, constrain

CFG = ModelConfig(architecture="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True, remat="full")


def test_constrain_is_the_identity_without_a_mesh():
    x = jnp.ones((4, 3, 2))
    assert constrain(x, ("batch", "length", "act_embed")) is x
    with activation_mesh(None):
        assert constrain(x, ("batch", "length", "act_embed")) is x


def test_constrain_checks_the_rank(devices):
    with activation_mesh(make_mesh({"data": 1, "fsdp": 8, "tensor": 1})):
        with pytest.raises(ValueError, match="logical axes"):
            constrain(jnp.ones((8, 2)), ("batch", "length", "act_embed"))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (8, 6)), jnp.int32)
    mask = jnp.asarray(np.arange(6)[None] >= rng.integers(0, 3, (8, 1)), jnp.int32)   # left padding
    return ids, mask


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2)])
def test_sharded_forward_and_gradient_follow_the_batch_and_match_unsharded(devices, batch, shape):
    ids, mask = batch
    model = init_model(CFG, seed=0)
    graphdef, params = nnx.split(model)

    def loss(p, ids, mask):
        h = nnx.merge(graphdef, p).hidden(ids, mask)
        return jnp.sum(h.astype(jnp.float32) ** 2), h

    ref_grad, ref_h = jax.grad(loss, has_aux=True)(params, ids, mask)
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), devices=devices)
    sharded = nnx.state(shard_model(init_model(CFG, seed=0), mesh))

    def constrained(p, ids, mask):
        with activation_mesh(mesh):
            return jax.grad(loss, has_aux=True)(p, ids, mask)

    fn = jax.jit(constrained, in_shardings=(state_shardings(sharded, mesh), None, None))
    grad, h = fn(sharded, ids, mask)
    batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    # The final hidden states come out split over the batch axes, as pinned (not as GSPMD chose).
    want = NamedSharding(mesh, P(batch_axes if len(batch_axes) > 1 else batch_axes[0], None, None))
    assert h.sharding.is_equivalent_to(want, h.ndim), h.sharding
    np.testing.assert_allclose(np.asarray(h), np.asarray(ref_h), atol=2e-5, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4),
                 grad, ref_grad)
    # The constraints are read while tracing: a fresh jit traced with them turned off has none.
    assert fn.lower(sharded, ids, mask).as_text().count("sdy.sharding_constraint") > 2 * CFG.num_layers
    with activation_rules(enabled=False):   # a new function: jit's trace cache is keyed by the function
        off = jax.jit(lambda *a: constrained(*a), in_shardings=(state_shardings(sharded, mesh), None, None))
        assert "sdy.sharding_constraint" not in off.lower(sharded, ids, mask).as_text()

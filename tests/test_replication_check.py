"""The start-up replication check (maxtext's): too many replicated parameter bytes fail with their names."""
import jax
import numpy as np
import pytest
from flax import nnx

from gold_jax import config as config_lib
from gold_jax.models import ModelConfig, init_model
from gold_jax.models.partition import shard_model
from gold_jax.sharding import LOGICAL_AXIS_RULES, make_mesh
from gold_jax.sharding.replication_check import check_replication, replication_report

# The default table with every parameter axis mapped to nothing: all parameters replicated.
NO_PARAM_SPLIT = tuple((k, None if k in ("embed", "vocab", "heads", "kv_heads", "mlp") else v)
                       for k, v in LOGICAL_AXIS_RULES)


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(architecture="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)
    return init_model(cfg, seed=0)


def _sharded(model, shape, rules=LOGICAL_AXIS_RULES):
    mesh = make_mesh(dict(data=shape[0], fsdp=shape[1], tensor=shape[2]))
    m = nnx.merge(*nnx.split(model))   # a fresh module: shard_model updates in place
    return nnx.state(shard_model(m, mesh, rules)), mesh


def _bytes(state):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def test_default_rules_pass_on_2x2x2(model):
    state, mesh = _sharded(model, (2, 2, 2))
    rep = check_replication(state, mesh, 0.25)
    # Only the norm scales stay replicated: compare with a count made here from the shapes.
    norms = sum(x.size * 4 for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(model))
                if "norm" in jax.tree_util.keystr(p))
    assert rep.fraction == pytest.approx(norms / _bytes(state))
    assert all("norm" in n for n, _ in rep.replicated)


def test_rules_that_replicate_too_much_fail_with_names(model):
    state, mesh = _sharded(model, (2, 2, 2), NO_PARAM_SPLIT)
    assert replication_report(state).fraction == pytest.approx(1.0)
    with pytest.raises(ValueError, match="max_replicated_fraction=0.25") as e:
        check_replication(state, mesh, 0.25)
    msg = str(e.value)
    assert "100.0%" in msg and "embed_tokens" in msg and "layers.0.mlp.gate_proj" in msg
    # The threshold key lets a run through.
    assert check_replication(state, mesh, 1.0).fraction == pytest.approx(1.0)


def test_pure_data_parallel_is_not_checked(model):
    state, mesh = _sharded(model, (8, 1, 1), NO_PARAM_SPLIT)
    assert check_replication(state, mesh, 0.0) is None


def test_abstract_shapes_give_the_same_report(model):
    state, mesh = _sharded(model, (1, 2, 4))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    a, b = replication_report(state), replication_report(abstract)
    assert a.replicated == b.replicated and np.isclose(a.fraction, b.fraction)


def test_config_key_is_validated():
    cfg = config_lib.base_config()
    assert cfg.mesh.max_replicated_fraction == 0.25
    cfg.mesh.max_replicated_fraction = 1.5
    with pytest.raises(ValueError, match="mesh.max_replicated_fraction"):
        config_lib.validate(cfg)

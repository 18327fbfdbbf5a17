import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import MESH_SHAPES
from gold_jax.sharding import logical_to_sharding, logical_to_spec, make_mesh, mesh_sizes, replicated_fraction


@pytest.mark.parametrize("shape", MESH_SHAPES)
def test_make_mesh_shapes(devices, shape):
    d, f, t = shape
    mesh = make_mesh({"data": d, "fsdp": f, "tensor": t})
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape


def test_make_mesh_rest_axis(devices):
    assert mesh_sizes({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    assert mesh_sizes({"data": 2, "fsdp": -1, "tensor": 1}, 8) == (2, 4, 1)
    assert tuple(make_mesh({"tensor": 4}).shape.values()) == (2, 1, 4)


@pytest.mark.parametrize("cfg,match", [
    ({"data": -1, "fsdp": 3, "tensor": 1}, "do not divide"),
    ({"data": 2, "fsdp": 2, "tensor": 4}, "use 16 devices"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one"),
    ({"data": 0, "fsdp": 1, "tensor": 8}, "mesh.data"),
])
def test_make_mesh_errors(devices, cfg, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(cfg)


def test_logical_rules_plain():
    assert logical_to_spec(("batch", "length", "act_vocab")) == P(("data", "fsdp"), None, "tensor")
    assert logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    with pytest.raises(ValueError, match="no rule"):
        logical_to_spec(("nonsense",))


@pytest.mark.parametrize("shape", MESH_SHAPES)
def test_logical_sharding_places_arrays(devices, shape):
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
    x = np.arange(16 * 32, dtype=np.float32).reshape(16, 32)
    sh = logical_to_sharding(mesh, ("embed", "vocab"), shape=x.shape)
    y = jax.device_put(x, sh)
    np.testing.assert_array_equal(np.asarray(y), x)
    # each shard holds 1/(fsdp*tensor) of the array (axes of size 1 drop out)
    shard = y.addressable_shards[0].data.shape
    assert shard == (16 // mesh.shape["fsdp"], 32 // mesh.shape["tensor"])
    # a dimension the mesh does not divide stays replicated
    odd = logical_to_spec(("kv_heads",), shape=(3,), mesh=mesh)
    assert odd == P(None)
    # tensor used once even if two logical names map to it
    assert logical_to_spec(("heads", "mlp"), shape=(8, 8), mesh=mesh) == P("tensor", None)


def test_replicated_fraction(devices):
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
    a = jax.device_put(jnp.ones((8, 8)), logical_to_sharding(mesh, ("embed", "vocab")))
    b = jax.device_put(jnp.ones((8, 8)), logical_to_sharding(mesh, (None, None)))
    assert replicated_fraction({"a": a, "b": b}) == pytest.approx(0.5)


def test_every_logical_rule_is_used():
    """No dead rules: each logical axis name appears (quoted) in some module besides the rules table."""
    import pathlib

    import gold_jax
    from gold_jax.sharding.rules import LOGICAL_AXIS_RULES
    root = pathlib.Path(gold_jax.__file__).parent
    text = "\n".join(p.read_text() for p in root.rglob("*.py") if p.name != "rules.py")
    unused = [name for name, _ in LOGICAL_AXIS_RULES if f'"{name}"' not in text]
    assert not unused, f"rules nobody names: {unused}"

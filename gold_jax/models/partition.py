"""Map the decoder's logical parameter axes onto a mesh (rules in gold_jax/sharding/rules.py)."""
from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from gold_jax.sharding.rules import LOGICAL_AXIS_RULES, logical_to_sharding


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _names(var: nnx.Variable, path) -> tuple:
    names = var.get_metadata().get("out_sharding")
    if names is None:
        return (None,) * var.get_value().ndim
    if len(names) != var.get_value().ndim:
        raise ValueError(f"parameter {jax.tree_util.keystr(path)} has shape "
                         f"{var.get_value().shape} but logical axes {names}")
    return tuple(names)


def _map_state(model_or_state, fn):
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return jax.tree_util.tree_map_with_path(
        lambda path, v: v.replace(fn(path, v)) if _is_var(v) else v, state, is_leaf=_is_var)


def state_shardings(model, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> nnx.State:
    """nnx.State of NamedSharding, the structure of nnx.state(model): jit in/out shardings."""
    return _map_state(model, lambda p, v: logical_to_sharding(
        mesh, _names(v, p), rules, shape=v.get_value().shape))


def shard_model(model, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """device_put every parameter with its sharding; updates `model` in place and returns it."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    sharded = jax.tree.map(lambda x, s: jax.device_put(x, s), state, shardings)
    nnx.update(model, sharded)
    return model

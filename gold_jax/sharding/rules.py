"""One table from logical axis names to mesh axes (maxtext's logical_axis_rules).

Model and loss code name only logical axes; this module is the single place that
decides where each one lives on the mesh.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MeshAxes = str | tuple[str, ...] | None

# Activations (act_*, batch, length; pinned by sharding/activations.py): batch over
# data+fsdp, the residual stream's embed replicated (weights are gathered, not the
# batch), heads / mlp / vocab on "tensor" as their weights.
# Parameters: fsdp over embed, tensor over heads / mlp / vocab.
LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),   # LoRA adapters (models/lora.py): A [in, r], B [r, out] follow their in/out axes
)


def _lookup(name: str | None, rules) -> MeshAxes:
    if name is None:
        return None
    for logical, mesh_axes in rules:
        if logical == name:
            return mesh_axes
    raise ValueError(f"logical axis {name!r} has no rule; known: {[r[0] for r in rules]}")


def mesh_axes(name: str, rules=LOGICAL_AXIS_RULES) -> tuple[str, ...]:
    """The mesh axes that logical axis `name` maps to, as a tuple (() = replicated)."""
    axes = _lookup(name, rules)
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


# Rows of a batch (inputs, activations, losses) split over these mesh axes.
BATCH_AXES: tuple[str, ...] = mesh_axes("batch")


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def logical_to_spec(names: Sequence[str | None], rules=LOGICAL_AXIS_RULES,
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical `names`.

    With `shape` and `mesh`, a dimension that the mesh axes do not divide (a tiny
    model's 2 kv heads over tensor=4) stays replicated instead of failing, and a
    mesh axis is never used twice in one spec.
    """
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        axes = _lookup(name, rules)
        if axes is not None:
            tup = (axes,) if isinstance(axes, str) else tuple(axes)
            if mesh is not None:
                tup = tuple(a for a in tup if a in mesh.shape and mesh.shape[a] > 1)
            tup = tuple(a for a in tup if a not in used)
            if shape is not None and mesh is not None and tup and shape[i] % _axis_size(mesh, tup):
                tup = ()
            used.update(tup)
            axes = None if not tup else (tup[0] if len(tup) == 1 else tup)
        out.append(axes)
    return P(*out)


def logical_to_sharding(mesh: Mesh, names: Sequence[str | None], rules=LOGICAL_AXIS_RULES,
                        shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules, shape=shape, mesh=mesh))


def replicated_fraction(tree) -> float:
    """Share of parameter bytes that are fully replicated (maxtext's check)."""
    total = repl = 0
    for leaf in jax.tree.leaves(tree):
        if not hasattr(leaf, "sharding"):
            continue
        n = leaf.size * leaf.dtype.itemsize
        total += n
        if leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) > 1:
            repl += n
    return repl / total if total else 0.0

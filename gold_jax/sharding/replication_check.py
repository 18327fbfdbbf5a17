"""Start-up check that the rule table really shards the parameters (maxtext's
`assert_params_sufficiently_sharded`).

A logical axis mapped to no mesh axis, or a dimension the mesh does not divide
(`rules.logical_to_spec` then leaves it replicated instead of failing), puts a
full copy of that parameter on every device. On a mesh with fsdp or tensor > 1
that is almost always a mistake that only shows up as an out-of-memory error
much later, so the trainer fails at start-up with the names of the biggest
offenders. Norm scales and biases are replicated by design; they are a few
tenths of a percent of a real model.

Works on real arrays and on `jax.ShapeDtypeStruct`s with shardings, so the
compiled memory plans (benchmarks/scale_plan.py) run the same check.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MODEL_AXES = ("fsdp", "tensor")   # the mesh axes that are meant to split parameters
DEFAULT_MAX_FRACTION = 0.25       # config.mesh.max_replicated_fraction


@dataclasses.dataclass(frozen=True)
class ReplicationReport:
    fraction: float                       # replicated bytes / all parameter bytes
    total_bytes: int
    replicated: tuple[tuple[str, int], ...]   # (parameter name, bytes), largest first


def _spec_axes(spec: P) -> set[str]:
    out: set[str] = set()
    for entry in spec:
        if entry is None:
            continue
        out.update((entry,) if isinstance(entry, str) else entry)
    return out


def _is_replicated(sharding: Any, sizes: dict[str, int]) -> bool:
    """True when no model axis of size > 1 splits the parameter."""
    if isinstance(sharding, NamedSharding):
        return not any(sizes.get(a, 1) > 1 for a in _spec_axes(sharding.spec) if a in MODEL_AXES)
    return bool(getattr(sharding, "is_fully_replicated", True))


def replication_report(params: Any) -> ReplicationReport:
    """Replicated share of the parameter bytes of `params` (arrays or ShapeDtypeStructs with shardings)."""
    total, rows = 0, []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None or not hasattr(leaf, "shape"):
            continue
        n = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        total += n
        sizes = dict(sharding.mesh.shape) if isinstance(sharding, NamedSharding) else {}
        if _is_replicated(sharding, sizes):
            rows.append((_name(path), n))
    rows.sort(key=lambda r: -r[1])
    return ReplicationReport(sum(n for _, n in rows) / total if total else 0.0, total, tuple(rows))


def _name(path: tuple) -> str:
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
        if key != "value":
            parts.append(str(key))
    return ".".join(parts)


def _model_parallel(mesh: Any) -> bool:
    return any(int(mesh.shape.get(a, 1)) > 1 for a in MODEL_AXES)


def check_replication(params: Any, mesh: Any, max_fraction: float = DEFAULT_MAX_FRACTION,
                      *, show: int = 8) -> ReplicationReport | None:
    """Raise ValueError when more than `max_fraction` of the parameter bytes is replicated.

    Only on meshes with fsdp or tensor > 1: on a pure data-parallel mesh every
    parameter is replicated by design. Returns the report (None when skipped).
    """
    if not _model_parallel(mesh):
        return None
    rep = replication_report(params)
    if rep.fraction > max_fraction:
        names = ", ".join(f"{n} ({b / 2**20:.2f} MiB)" for n, b in rep.replicated[:show])
        more = len(rep.replicated) - show
        raise ValueError(
            f"{rep.fraction:.1%} of the parameter bytes ({sum(b for _, b in rep.replicated) / 2**20:.1f} of "
            f"{rep.total_bytes / 2**20:.1f} MiB) are replicated on mesh {dict(mesh.shape)}, above "
            f"config.mesh.max_replicated_fraction={max_fraction:g}: {names}"
            + (f" and {more} more" if more > 0 else "")
            + ". Their logical axes map to no mesh axis of size > 1, or the mesh does not divide them "
              "(gold_jax/sharding/rules.py); change the rules or the mesh, or raise the threshold")
    return rep

"""Build the ("data", "fsdp", "tensor") device mesh from config sizes."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def _get(config: Any, key: str, default: int) -> int:
    if config is None:
        return default
    if isinstance(config, Mapping):
        return int(config.get(key, default))
    return int(getattr(config, key, default))


def mesh_sizes(config: Any, n_devices: int) -> tuple[int, int, int]:
    """Resolve the three axis sizes; exactly one of them may be -1 ("the rest")."""
    sizes = [_get(config, a, d) for a, d in zip(MESH_AXES, (-1, 1, 1))]
    for name, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
            raise ValueError(f"mesh.{name}={s}: sizes must be positive or -1 (the rest)")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(
                f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the {n_devices} devices "
                f"(the fixed axes need a multiple of {known})")
        sizes[sizes.index(-1)] = n_devices // known
    elif known != n_devices:
        raise ValueError(
            f"mesh sizes {dict(zip(MESH_AXES, sizes))} use {known} devices but {n_devices} are given")
    return tuple(sizes)


def make_mesh(config: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with axes ("data", "fsdp", "tensor") built from `config.{data,fsdp,tensor}`.

    Axes are Auto so jit propagates shardings (GSPMD) and shard_map can go Manual
    inside the loss.
    """
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_sizes(config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)

"""Per-host rollout: with several processes, each samples its own rows with a local copy of the student.

The rollout engine of a multi-process run never touches another host's
devices: sampling is a computation on this process's devices only (the
"local mesh"), so the hosts may take different times, or one may sample
while another does not, without any collective waiting on them.

How the weights reach every host after an update (no full copy through any
host's memory, host 0's included):

1. `LocalCopy` runs a jit'd identity on the *training* mesh whose output
   shardings are the parameters' own PartitionSpecs with every mesh axis that
   spans processes dropped (`spanning_axes`). XLA all-gathers over exactly
   those axes, device to device. Each process then holds one full copy of the
   student, still split over its own devices along the axes inside a host
   (e.g. fsdp within a host, hosts on data: a gather over data only).
2. The per-device buffers are relabelled, without a copy, as arrays on the
   process's local mesh (`local_mesh`: the same axis names, the spanning axes
   sized to this process's share) with jax.make_array_from_single_device_arrays.
3. The sampler reshards them to its own rules on the local mesh
   (jax.device_put among this process's devices).

When a process's devices do not form one block of the training mesh, every
axis counts as spanning: each device gets a full replica (correct, more memory).
Rows keep their global identity: the sampler draws row i's randomness from
fold_in(seed, global row index), so 2 hosts x 4 devices sample the same tokens
as 1 host x 8 devices given the same weights.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def _process_ids(mesh: Mesh) -> np.ndarray:
    return np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)


def is_multi_process(mesh: Mesh) -> bool:
    """The mesh holds devices of more than one process."""
    return len(set(_process_ids(mesh).flat)) > 1


def spanning_axes(mesh: Mesh) -> tuple[str, ...]:
    """Mesh axes along which the devices belong to more than one process."""
    ids = _process_ids(mesh)
    return tuple(name for ax, name in enumerate(mesh.axis_names)
                 if not (ids == np.take(ids, [0], axis=ax)).all())


def local_mesh(mesh: Mesh, process_index: int | None = None) -> tuple[Mesh, tuple[str, ...]]:
    """(this process's block of `mesh` as a mesh with the same axis names, the axes dropped from specs)."""
    p = jax.process_index() if process_index is None else process_index
    ids = _process_ids(mesh)
    mine = ids == p
    if not mine.any():
        raise ValueError(f"the mesh holds no device of process {p}")
    span = spanning_axes(mesh)
    index = []
    for ax, name in enumerate(mesh.axis_names):
        others = tuple(i for i in range(ids.ndim) if i != ax)
        index.append(np.nonzero(mine.any(axis=others))[0] if name in span else np.arange(ids.shape[ax]))
    block = np.ix_(*index)
    kw = {"axis_types": mesh.axis_types} if hasattr(mesh, "axis_types") else {}
    if (ids[block] == p).all() and ids[block].size == int(mine.sum()):
        return Mesh(mesh.devices[block], mesh.axis_names, **kw), span
    flat = mesh.devices[mine].reshape((-1,) + (1,) * (ids.ndim - 1))
    return Mesh(flat, mesh.axis_names, **kw), tuple(mesh.axis_names)


def drop_axes(spec: P, axes: tuple[str, ...]) -> P:
    """`spec` with the mesh axes in `axes` removed (those dimensions replicated over them)."""
    out = []
    for entry in spec:
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        kept = tuple(n for n in names if n not in axes)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return P(*out)


class LocalCopy:
    """Callable: a tree of arrays on the training `mesh` (all processes) -> the same values as arrays
    on this process's `local` mesh. A collective: every process calls it at the same point."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.local, self.span = local_mesh(mesh)
        self._fns: dict[Any, Any] = {}

    def _spec(self, x: Any) -> P:
        sh = getattr(x, "sharding", None)
        if isinstance(sh, NamedSharding) and sh.mesh.devices.shape == self.mesh.devices.shape \
                and (sh.mesh.devices == self.mesh.devices).all():
            return drop_axes(sh.spec, self.span)
        return P()   # any other layout: replicated (still device to device)

    def __call__(self, tree: Any) -> Any:
        leaves, treedef = jax.tree.flatten(tree)
        specs = tuple(self._spec(x) for x in leaves)
        key = (treedef, specs, tuple((x.shape, str(x.dtype)) for x in leaves))
        fn = self._fns.get(key)
        if fn is None:
            out = [NamedSharding(self.mesh, s) for s in specs]
            fn = self._fns[key] = jax.jit(lambda xs: [x for x in xs], out_shardings=out)
        gathered = fn(leaves)
        local_devices = set(self.local.devices.flat)
        local = [jax.make_array_from_single_device_arrays(
            x.shape, NamedSharding(self.local, s),
            [sh.data for sh in x.addressable_shards if sh.device in local_devices])
            for x, s in zip(gathered, specs)]
        return jax.tree.unflatten(treedef, local)


def needs_local_copy(tree: Any) -> bool:
    """Some leaf lives (partly) on another process's devices."""
    return any(not getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree))

"""Multi-process runs: start-up, agreement checks across processes, per-process checkpoint items.

Every process runs the same host loop on its slice of the global batch, so
every decision that leads to a collective (the λ coin, whether there is a next
batch, the config itself) must come out the same on every process, or one of
them waits forever in a collective the others never enter. These checks gather
a few integers from every process and raise on all of them at once when they
differ: a loud failure instead of a hang.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

# Keys that may differ between processes (each host its own id, teacher address or port).
PER_PROCESS_KEYS = ("distributed.process_id", "teacher.address", "teacher.port")


def initialize(cfg: ml_collections.ConfigDict) -> None:
    """jax.distributed.initialize for multi-process runs (before any device is touched), then check
    that every process was started with the same config.

    On TPU pods and SLURM, JAX finds the coordinator, process count and id in the environment
    when `distributed.num_processes > 1` and the rest is left empty; elsewhere (and in the tests,
    on 127.0.0.1 with CPU devices and JAX's Gloo collectives) all three are given.
    """
    d = cfg.distributed
    if not (d.coordinator_address or d.num_processes > 1):
        return
    jax.distributed.initialize(coordinator_address=d.coordinator_address or None,
                               num_processes=d.num_processes or None,
                               process_id=d.process_id if d.process_id >= 0 else None)
    check_same_config(cfg)
    check_rollout_supported(cfg)


def check_rollout_supported(cfg: ml_collections.ConfigDict) -> None:
    """Refuse on-policy batches with several processes, before any model loads.

    The rollout engines are single-host: each process holds only its own prompts, and the JAX
    sampler would put them on the global mesh as if they were the whole batch (jax.device_put
    then fails on a cross-process equality check). Per-host rollout (each host samples its own
    rows with a local copy of the student) is not built yet.
    """
    if jax.process_count() > 1 and cfg.gold.lmbda > 0:
        raise ValueError(f"config.gold.lmbda={cfg.gold.lmbda:g} with {jax.process_count()} processes: the rollout "
                         "engines are single-host (per-host rollout is not built yet), so on-policy batches need "
                         "one process; use gold.lmbda=0 (off-policy, or gold.seq_kd=True for teacher-generated "
                         "completions) on several hosts")


def config_digest(cfg: ml_collections.ConfigDict) -> int:
    """63-bit hash of the config without the keys that may differ per process."""
    flat = {}

    def walk(node: Any, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, ml_collections.ConfigDict):
                walk(v, key + ".")
            elif key not in PER_PROCESS_KEYS:
                flat[key] = v
    walk(cfg, "")
    text = json.dumps(flat, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def agree(values: Sequence[int], what: str) -> np.ndarray:
    """Gather `values` (ints below 2**31) from every process; raise on all processes when they differ.

    Returns the [processes, len(values)] table. Single process: no communication.
    """
    local = np.asarray(values, np.int32).reshape(-1)
    if jax.process_count() == 1:
        return local[None]
    table = np.asarray(multihost_utils.process_allgather(local))
    if (table != table[:1]).any():
        rows = "; ".join(f"process {i}: {list(map(int, r))}" for i, r in enumerate(table))
        raise RuntimeError(f"processes disagree on {what} ({rows}): every process must make the same "
                           "decision, or the next collective would hang")
    return table


def check_same_config(cfg: ml_collections.ConfigDict) -> None:
    d = config_digest(cfg)
    agree([d & 0x7FFFFFFF, (d >> 31) & 0x7FFFFFFF],
          "the run config (same config file and overrides on every host, apart from "
          f"{', '.join(PER_PROCESS_KEYS)})")


def _digest(obj: Any) -> list[int]:
    h = int.from_bytes(hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).digest()[:8], "little")
    return [h & 0x7FFFFFFF, (h >> 31) & 0x7FFFFFFF]


def check_same_host_state(host: dict[str, Any]) -> None:
    """The host loop's state (step, RNG, data position) is saved once, by process 0: it must be
    the same on every process."""
    agree(_digest(host), "the host-loop state being checkpointed (step, RNG, data position)")


def pack_per_process(tree: Any) -> Any:
    """Checkpoint form of a tree that differs per process (the queued batches hold each process's
    rows): every process's copy stacked on a leading process axis, so process 0 writes one item
    with all of them and nothing is written twice. Unchanged with one process."""
    if jax.process_count() == 1:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    agree(_digest([(str(np.asarray(x).dtype), np.asarray(x).shape) for x in leaves]), "checkpoint item shapes")
    stacked = [np.asarray(multihost_utils.process_allgather(np.asarray(x))) for x in leaves]
    return {"per_process": jax.tree.unflatten(treedef, stacked),
            "processes": np.asarray(jax.process_count(), np.int32)}


def unpack_per_process(tree: Any, count_key: str = "count") -> Any:
    """This process's part of a tree written by `pack_per_process`."""
    saved = int(np.asarray(tree["processes"])) if "per_process" in tree else 1
    if "per_process" in tree:
        if saved != jax.process_count():
            raise ValueError(f"the checkpoint's queued batches were written by {saved} processes, this run has "
                             f"{jax.process_count()}: resume with the same number of processes")
        return jax.tree.map(lambda x: np.asarray(x)[jax.process_index()], tree["per_process"])
    if jax.process_count() > 1 and int(np.asarray(tree.get(count_key, 0))):
        raise ValueError(f"the checkpoint's queued batches were written by 1 process, this run has "
                         f"{jax.process_count()}: resume with the same number of processes")
    return tree

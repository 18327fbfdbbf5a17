"""Multi-process runs: start-up, agreement checks across processes, per-process checkpoint items.

Every process runs the same host loop on its slice of the global batch, so
every decision that leads to a collective (the λ coin, whether there is a next
batch, the config itself) must come out the same on every process, or one of
them waits forever in a collective the others never enter. These checks gather
a few integers from every process and raise on all of them at once when they
differ: a loud failure instead of a hang.

Before every batch, `StepCheck` compares the producer's decisions (step, λ coin,
row coins, end of data, a digest of the shared RNG) through the coordinator's
key-value store with a deadline (`distributed.check_timeout_s`), so a process
that disagrees or never arrives stops every process with a message that names
the processes and their values. On-policy batches are sampled per host
(gold_jax.rollout.per_host): each process samples its own rows with a copy of
the student gathered to its own devices.
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
    """Refuse the rollout layouts that several processes cannot run, before any model loads.

    The JAX engine samples per host (gold_jax.rollout.per_host): each process samples its own rows
    on its own devices with a gathered copy of the student. Not built for several processes: the
    vLLM engine (its weight sync reads the parameters on the host), and rollout devices reserved
    apart from training (rollout.n_devices > 0 takes the first devices of the global list, i.e.
    whole hosts, rather than a share of every host).
    """
    n = jax.process_count()
    if n == 1:
        return
    if cfg.rollout.engine == "vllm":
        raise ValueError(f"config.rollout.engine='vllm' with {n} processes: per-host vLLM rollout is not built "
                         "(its weight sync would need every parameter on each host); use rollout.engine='jax', "
                         "which samples each host's rows on its own devices")
    if cfg.rollout.n_devices > 0:
        raise ValueError(f"config.rollout.n_devices={cfg.rollout.n_devices} with {n} processes: reserved rollout "
                         "devices are single-host; use rollout.n_devices=0 (each host samples on its share of "
                         "the training devices)")


class StepCheck:
    """Before each batch is made, every process compares its decisions (step, λ coin, row coins, end of
    data, RNG digest: gold_jax.onpolicy.decision) with every other process's.

    Through the coordinator's key-value store (the service jax.distributed.initialize started), with a
    deadline: a process that disagrees raises on every process with all values, and a process that
    never arrives makes the others raise after `timeout_s` naming it, instead of a collective that
    waits forever. `every` > 1 checks every that many calls. One process: nothing to do.
    """

    def __init__(self, every: int = 1, timeout_s: float = 300.0, name: str = "batch"):
        self.every, self.timeout_s, self.name = int(every), float(timeout_s), name
        self.calls = 0

    @classmethod
    def from_config(cls, cfg: Any) -> StepCheck:
        d = cfg.get("distributed", {}) if hasattr(cfg, "get") else {}
        return cls(int(d.get("check_every", 1)), float(d.get("check_timeout_s", 300.0)))

    def __call__(self, values: dict[str, int]) -> None:
        n, self.calls = self.calls, self.calls + 1
        if jax.process_count() == 1 or self.every < 1 or n % self.every:
            return
        client = _kv_client()
        what = f"the decisions for the next batch ({', '.join(values)})"
        if client is None:   # no coordination service: the collective check (no deadline)
            agree(list(values.values()), what)
            return
        agree_kv(client, jax.process_index(), jax.process_count(), f"gold_jax/{self.name}/{n}", values,
                 what, self.timeout_s)
        if n >= self.every:   # every process has read it: they all wrote call n, after reading call n - every
            try:
                client.key_value_delete(f"gold_jax/{self.name}/{n - self.every}/{jax.process_index()}")
            except Exception:  # noqa: BLE001 - a leftover key costs a few bytes
                pass


def _kv_client() -> Any:
    try:
        from jax._src import distributed as jax_distributed   # as orbax does; no public handle in JAX 0.10
        return jax_distributed.global_state.client
    except Exception:  # noqa: BLE001
        return None


def agree_kv(client: Any, me: int, count: int, key: str, values: dict[str, int], what: str,
             timeout_s: float) -> None:
    """Publish `values` under key/me, read every other process's with a deadline, raise on any difference."""
    values = dict(sorted(values.items()))   # every process's values print in the same key order
    client.key_value_set(f"{key}/{me}", json.dumps(values, sort_keys=True))
    table, missing = {me: values}, []
    for p in range(count):
        if p == me:
            continue
        try:
            table[p] = json.loads(client.blocking_key_value_get(f"{key}/{p}", max(1, int(timeout_s * 1000))))
        except Exception:  # noqa: BLE001 - the runtime raises its own error type on a deadline
            missing.append(p)
    if missing:
        raise RuntimeError(f"process {me}: process(es) {missing} did not report {what} within {timeout_s:g}s "
                           f"(distributed.check_timeout_s; check {key}): they are stuck, slower by more than "
                           f"that, or dead; mine: {values}")
    if any(table[p] != values for p in table):
        rows = "; ".join(f"process {p}: {table[p]}" for p in sorted(table))
        raise RuntimeError(f"process {me}: processes disagree on {what} at {key} ({rows}): every process must "
                           "make the same decision, or the next collective would hang")


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

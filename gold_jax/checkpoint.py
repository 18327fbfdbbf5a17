"""Orbax checkpoints of everything a bitwise-exact resume needs.

A step directory holds three items:
- "state":   TrainState (float32 params, optimizer state, update and skip counters), restored
             with the live shardings;
- "host":    JSON: step, host RNG state, JAX key seed, data-iterator state, on-policy counters;
- "pending": the batches already generated (and teacher-scored) for later steps but not yet
             trained on (one_step_off / two_step_off), so a resume never regenerates them with
             different weights.
Orbax writes into a temporary directory and renames it when complete, so a crash mid-save
leaves the previous checkpoint as the latest good one. The teacher is never checkpointed.
"""
from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gold_jax import jsonsafe
from gold_jax.distributed import check_same_host_state, pack_per_process, unpack_per_process  # H6


def _pack_pending(batches: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    # Orbax cannot save an empty tree: a count leaf is always there.
    tree: dict[str, Any] = {"count": np.asarray(len(batches), np.int32)}
    for i, b in enumerate(batches):
        tree[f"b{i}"] = {k: np.asarray(v) for k, v in b.items() if v is not None}
    return tree


def _unpack_pending(tree: dict[str, Any]) -> list[dict[str, np.ndarray]]:
    n = int(np.asarray(tree["count"]))
    return [{k: np.asarray(v) for k, v in tree[f"b{i}"].items()} for i in range(n)]


class CorruptCheckpointError(ValueError):
    """A step directory that cannot be restored; the message says which step to fall back to.

    A ValueError, so the command-line tools print it as one line (gold_jax.cli_errors)."""


class Checkpointer:
    """keep-last-N orbax CheckpointManager under `directory` (usually run_dir/checkpoints)."""

    def __init__(self, directory: str, *, keep: int = 3):
        self.directory = os.path.abspath(directory)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self._mgr = ocp.CheckpointManager(self.directory, options=opts,
                                          item_names=("state", "host", "pending"))

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(self, step: int, state: Any, host: dict[str, Any], pending: list[dict[str, np.ndarray]]) -> None:
        # Multi-process (H6): the state's shards are written by their own process; the host JSON by
        # process 0 (checked equal everywhere); the queued batches, which hold each process's rows,
        # gathered and written once by process 0.
        check_same_host_state(host)
        self._mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            host=ocp.args.JsonSave(jsonsafe.encode(host)),
            pending=ocp.args.StandardSave(pack_per_process(_pack_pending(pending)))))
        self._mgr.wait_until_finished()

    def restore(self, step: int | None, state_like: Any) -> tuple[Any, dict[str, Any], list[dict[str, np.ndarray]]]:
        """(state, host, pending) at `step` (None = latest); the state takes `state_like`'s shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state_like)
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore(),
                pending=ocp.args.StandardRestore()))
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore chain dozens of frames: one message instead
            raise CorruptCheckpointError(self._corrupt_message(step, e)) from None
        return out["state"], jsonsafe.decode(out["host"]), _unpack_pending(unpack_per_process(out["pending"]))

    def _corrupt_message(self, step: int, err: BaseException) -> str:
        step_dir = os.path.join(self.directory, str(step))
        texts, seen = [], set()
        while err is not None and id(err) not in seen:   # the file is named somewhere down the chain
            seen.add(id(err))
            texts.append(str(err))
            err = err.__cause__ or err.__context__
        found = [m for t in texts for m in re.findall(re.escape(step_dir) + r"[^\s'\",:;)\]]*", t)
                 if m.rstrip("/") != step_dir]
        where = found[0] if found else step_dir
        earlier = [s for s in self.all_steps() if s < step]
        fallback = f"step {max(earlier)}" if earlier else "step 0 (no earlier checkpoint: the run starts over)"
        reason = texts[-1].strip().splitlines()[0][:300] if texts[-1].strip() else "unreadable"
        return (f"checkpoint step {step} is unreadable ({where}: {reason}); "
                f"delete that step directory ({step_dir}) to fall back to {fallback}")

    def restore_host(self, step: int) -> dict[str, Any]:
        """Only the host JSON of `step` (cheap): checked before the state is restored (LoRA base reference)."""
        return jsonsafe.decode(self._mgr.restore(step, args=ocp.args.Composite(host=ocp.args.JsonRestore()))["host"])

    def restore_params(self, step: int | None = None) -> Any:
        """Only the saved state tree (numpy-free restore on the default device): export."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]

    def close(self) -> None:
        self._mgr.close()

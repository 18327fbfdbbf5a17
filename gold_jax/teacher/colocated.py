"""The teacher inside the jit'd train step (config `teacher.mode="colocated"`).

The teacher's NNX model is loaded onto the training mesh, sharded by the same
logical-axis rules as the student, in bfloat16 on accelerators (float32 on
CPU). It has no gradient and no optimizer state and is never checkpointed: its
parameters are a separate, non-donated argument of the step, not part of
TrainState. Its forward runs in the step that trains on the batch, so under
the off-policy schedulers a queued batch is scored by the step that uses it,
and nothing travels to or from a server. Its final normed hidden states at the
completion positions and its lm head feed `fused_jsd`'s "hidden" mode: the
exact dense JSD, with no [N, V] tensor anywhere.

The same two batch fields carry a remote teacher's hidden states
(`gold.teacher_signal="hidden"`); the head then comes from the teacher's HF
folder or the server (gold_jax.teacher.head) and is the step's argument alone.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import Future
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gold_jax.types import TeacherScores

# Batch fields of the hidden teacher signal (gold_jax.losses.registry.SIGNALS["hidden"]).
HIDDEN, HEAD = "teacher_hidden", "teacher_head"


@dataclasses.dataclass
class StepTeacher:
    """What the train step needs from a teacher that is not in the batch.

    `arrays`: a pytree passed to the jit'd step as a non-donated argument (the
    colocated teacher's nnx.State, or a remote teacher's head [Ht, V]);
    `graphdef`: the colocated teacher's static graph (None: `arrays` is a head).
    """
    arrays: Any
    graphdef: Any = None


def completion_span(batch: dict[str, jax.Array]) -> tuple[int, int]:
    """(P - 1, P + R - 1): the positions whose outputs predict the R completion tokens (gold_jax.types)."""
    r = batch["completion_mask"].shape[1]
    p = batch["input_ids"].shape[1] - r
    return p - 1, p + r - 1


def teacher_fields(graphdef: Any, arrays: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """`batch` with the hidden-signal fields the step adds: the head, and for a colocated teacher its
    hidden states at the completion positions (its forward, in the teacher's dtype). No gradient flows."""
    if arrays is None:
        return batch
    if graphdef is None:
        return {**batch, HEAD: jax.lax.stop_gradient(arrays)}
    model = nnx.merge(graphdef, arrays)
    lo, hi = completion_span(batch)
    h = model.hidden(batch["input_ids"], batch["attention_mask"])[:, lo:hi]
    return {**batch, HIDDEN: jax.lax.stop_gradient(h), HEAD: jax.lax.stop_gradient(model.lm_head_weight())}


def load_colocated(path: str, mesh: Any, dtype: str, vocab_size: int) -> StepTeacher:
    """The teacher of HF folder `path` on `mesh`, weights and compute in `dtype` (never trained).

    `vocab_size` is the student tokenizer's size: the teacher's embedding must cover it.
    """
    from gold_jax.models.hf_io import load_pretrained
    model = load_pretrained(path, dtype=dtype, param_dtype=dtype, mesh=mesh)
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"config.model.teacher_path={path!r}: the teacher has {model.config.vocab_size} embedding "
                         f"rows, fewer than the student tokenizer's {vocab_size} ids")
    graphdef, params = nnx.split(model)
    return StepTeacher(params, graphdef)


class ColocatedHandle:
    """The trainer's teacher handle when the teacher runs in the step: nothing to score on the host.

    `score` returns a finished future of empty TeacherScores (the batch producer
    keeps its one code path); `step_teacher` is what the train step takes.
    """

    def __init__(self, step_teacher: StepTeacher, model_name: str = "colocated"):
        self.step_teacher, self.model_name = step_teacher, model_name

    def score(self, seq: Any, *, cacheable: bool = False) -> Future:
        f: Future = Future()
        f.set_result(TeacherScores(logprobs=None, ids=None, topk_logmass=None, token_logprob=None))
        return f

    def generate(self, *args: Any, **kw: Any) -> Future:
        raise ValueError("config.teacher.mode='colocated' cannot sample completions (config.gold.seq_kd=True "
                         "needs a teacher server)")

    def info(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "mode": "colocated"}

    def close(self) -> None:
        self.step_teacher = None


def teacher_dtype(name: str, platform: str) -> str:
    """teacher.dtype "auto": bfloat16 on accelerators, float32 on CPU."""
    return ("float32" if platform == "cpu" else "bfloat16") if name == "auto" else name


def place_head(head: Any, mesh: Any, dtype: str) -> jax.Array:
    """A remote teacher's head [Ht, V] on the training mesh, sharded as the student's ("embed", "vocab")."""
    from gold_jax.sharding.rules import logical_to_sharding
    head = jnp.asarray(head, dtype)
    return jax.device_put(head, logical_to_sharding(mesh, ("embed", "vocab"), shape=head.shape))

"""Sharding constraints on the decoder's activations (maxtext's activation rules).

Why: the parameters are split on "embed" over fsdp and the batch over
data x fsdp. With nothing pinning the activations, GSPMD is free to split the
[tokens, embed] x [embed, ...] contractions over fsdp and all-reduce the partial
activations, which at fsdp=8 costs more memory (temp) and far more traffic than
gathering the weights (benchmarks/results/scale_plan.md). Pinning the residual
stream and the projections' outputs to the batch axes makes XLA gather each
weight (all-gather) and reduce-scatter its gradient instead: the fsdp pattern.

The model learns the mesh from `activation_mesh(mesh)`, entered *inside* the
function being traced (gold_jax.train_step does it with the step's mesh), so a
jit cache can never hold a trace made under another mesh. Outside that context
(unsharded runs, the sampler, the teacher backend) `constrain` returns its input
unchanged; inside it only the partitioning changes, never the values.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh

from gold_jax.sharding.rules import LOGICAL_AXIS_RULES, logical_to_sharding

_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("gold_jax_activation_mesh", default=None)
_OFF = object()
# The rules table for activations; _OFF turns every constraint off (benchmarks/scale_plan.py --no-constraints).
_RULES: contextvars.ContextVar = contextvars.ContextVar("gold_jax_activation_rules", default=LOGICAL_AXIS_RULES)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None) -> Iterator[None]:
    """Constrain activations to `mesh` while tracing inside this block (None: no constraints)."""
    token = _MESH.set(mesh)
    try:
        yield
    finally:
        _MESH.reset(token)


@contextlib.contextmanager
def activation_rules(rules=LOGICAL_AXIS_RULES, *, enabled: bool = True) -> Iterator[None]:
    """Trace with another activation rule table, or (enabled=False) with no activation constraints.

    For comparing plans (benchmarks/scale_plan.py); the parameters' shardings are not affected. Like
    `activation_mesh` it acts while tracing: a function jit has already traced keeps its constraints.
    """
    token = _RULES.set(rules if enabled else _OFF)
    try:
        yield
    finally:
        _RULES.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`x` pinned to the sharding of logical axes `names` on the current activation mesh; else `x`.

    A dimension the mesh axes do not divide stays replicated (rules.logical_to_spec).
    """
    mesh, rules = _MESH.get(), _RULES.get()
    if mesh is None or rules is _OFF:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: logical axes {tuple(names)} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, logical_to_sharding(mesh, names, rules, shape=x.shape))

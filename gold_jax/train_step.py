"""The jit-compiled GOLD update: student forward, JSD loss, grads, clipping, optax.

Pure functions only; the host loop (trainer.py) owns every bit of state.
The loss is a *sum* over completion tokens divided by the number of completion
tokens in the whole step (all micro-batches), so gradient accumulation over
micro-batches gives the same gradient as one big batch.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gold_jax.losses import registry
from gold_jax.losses.registry import LossSpec
from gold_jax.names import LR_SCHEDULES
from gold_jax.sharding.activations import activation_mesh
from gold_jax.sharding.rules import BATCH_AXES
from gold_jax.teacher.colocated import StepTeacher, teacher_fields


class TrainState(NamedTuple):
    params: Any          # nnx.State, float32 master weights
    opt_state: Any       # optax state (float32)
    step: jax.Array      # number of applied updates (skipped steps do not count)
    skipped: jax.Array   # number of skipped (non-finite) steps


def make_schedule(opt_cfg: Any, total_steps: int) -> optax.Schedule:
    """Warmup then cosine / linear decay to min_lr_ratio * lr, or constant."""
    lr, warm = float(opt_cfg.lr), int(opt_cfg.warmup_steps)
    end = lr * float(opt_cfg.min_lr_ratio)
    decay = max(int(total_steps) - warm, 1)
    if opt_cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay, alpha=float(opt_cfg.min_lr_ratio))
    elif opt_cfg.schedule == "linear":
        after = optax.linear_schedule(lr, end, decay)
    elif opt_cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    else:
        raise ValueError(f"optimizer.schedule={opt_cfg.schedule!r}: must be one of {LR_SCHEDULES}")
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def warmup_warning(opt_cfg: Any, total_steps: int) -> str | None:
    """A message when the warmup does not end before the run does (the lr never reaches optimizer.lr)."""
    warm = int(opt_cfg.warmup_steps)
    if warm == 0 or warm < int(total_steps):
        return None
    return (f"config.optimizer.warmup_steps={warm} >= the run's {int(total_steps)} steps: the learning rate "
            f"never reaches config.optimizer.lr={opt_cfg.lr} (the last step uses "
            f"{float(opt_cfg.lr) * (int(total_steps) - 1) / warm:.3g})")


def make_optimizer(opt_cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with the schedule over `total_steps` (the run's length, known once the data is read)."""
    msg = warmup_warning(opt_cfg, total_steps)
    if msg:
        logging.warning(msg)
    sched = make_schedule(opt_cfg, total_steps)
    parts = [optax.clip_by_global_norm(float(opt_cfg.max_grad_norm))] if opt_cfg.max_grad_norm > 0 else []
    parts.append(optax.adamw(sched, b1=float(opt_cfg.b1), b2=float(opt_cfg.b2), eps=float(opt_cfg.eps),
                             weight_decay=float(opt_cfg.weight_decay)))
    return optax.chain(*parts), sched


def _param_mesh(params: Any) -> Mesh | None:
    for x in jax.tree.leaves(params):
        if isinstance(getattr(x, "sharding", None), NamedSharding):
            return x.sharding.mesh
    return None


def init_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """Optimizer state under jit so it inherits the parameters' shardings.

    Leaves that jit leaves on one device (Adam's step count, our counters) are
    replicated over the parameters' mesh: the jit'd step needs every input on it.
    """
    state = TrainState(params, jax.jit(tx.init)(params), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    mesh = _param_mesh(params)
    if mesh is None:
        return state
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, rep), state)


def _cast(tree: Any, dtype: str) -> Any:
    if dtype == "float32":
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def loss_sum(model: nnx.Module, batch: dict[str, jax.Array], spec: LossSpec, mesh: Mesh | None,
             objective: bool = True) -> Any:
    """Sum of the per-token loss over completion tokens (mask = 1) of one micro-batch.

    The loss itself comes from the table in gold_jax.losses.registry (spec.impl).
    """
    r = batch["completion_mask"].shape[1]
    p = batch["input_ids"].shape[1] - r
    # The distribution that predicts completion token j sits at position P-1+j (gold_jax.types).
    h = model.hidden(batch["input_ids"], batch["attention_mask"])[:, p - 1:p + r - 1]
    if objective and uses_objective(spec) and "teacher_hidden" not in batch and spec.impl != "uld":
        # H8: per-row JSD/OPD, importance weights and diagnostics: returns (sum, aux sums).
        from gold_jax.losses.objective import objective_sum
        return objective_sum(model, h, batch, spec, mesh)
    return registry.get(spec.impl).load()(model, h, batch, spec, mesh)


def uses_objective(spec: LossSpec) -> bool:
    """Whether the step needs gold_jax.losses.objective (anything beyond one JSD for the whole batch)."""
    return spec.loss != "jsd" or spec.importance_correction or spec.diagnostics or spec.per_row


def _grads_loss_aux(*args: Any, **kw: Any) -> tuple:
    return grads_and_loss(*args, with_aux=True, **kw)


def _split_aux(out: Any, n_tok: jax.Array) -> tuple[jax.Array, dict]:
    """(loss / n_tok, aux) from a loss returning a sum or (sum, aux sums)."""
    total, aux = out if isinstance(out, tuple) else (out, {})
    return total / n_tok, aux


def _add_aux(a: dict, b: dict) -> dict:
    """Aux (sum, count) pairs of two micro-batches; "*_max" entries keep the larger value."""
    return {k: ((jnp.maximum(a[k][0], b[k][0]), a[k][1]) if k.endswith("_max") else
                (a[k][0] + b[k][0], a[k][1] + b[k][1])) for k in a}


def _micro(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """[B, ...] -> [n, B/n, ...] with strided rows, so every micro-batch spans all batch shards."""
    return {k: jnp.swapaxes(v.reshape(v.shape[0] // n, n, *v.shape[1:]), 0, 1) for k, v in batch.items()}


def _model(graphdef: Any, params: Any, frozen: Any, dtype: str, dropout_key: jax.Array | None = None) -> nnx.Module:
    """The student from its trained `params` and, for a LoRA student, its `frozen` base (models/lora.py)."""
    if frozen is not None and dropout_key is not None:
        # LoRA dropout: a fresh mask per step and adapter. The frozen state's RNG keys are replaced
        # functionally (it is never written back, so its counters alone would repeat the masks).
        leaves, tree = jax.tree.flatten(frozen)
        is_key = [jnp.issubdtype(x.dtype, jax.dtypes.prng_key) for x in leaves]
        leaves = [jax.random.fold_in(dropout_key, i) if k else x for i, (x, k) in enumerate(zip(leaves, is_key))]
        frozen = jax.tree.unflatten(tree, leaves)
    states = (_cast(params, dtype),) + (() if frozen is None else (_cast(frozen, dtype),))
    return nnx.merge(graphdef, *states)


def grads_and_loss(graphdef: Any, params: Any, batch: dict[str, jax.Array], spec: LossSpec,
                   n_micro: int, mesh: Mesh | None = None,
                   loss_fn: Callable | None = None, frozen: Any = None,
                   dropout_key: jax.Array | None = None, teacher: Any = None,
                   teacher_graphdef: Any = None, with_aux: bool = False) -> tuple:
    """(loss, grads, n_tokens[, aux]): mean loss over all completion tokens of the step and its gradient.

    with_aux: also the loss's aux sums (a loss returning (sum, aux); {} otherwise), summed over micro-batches.

    With a LoRA student `params` are the adapters (the only leaves differentiated) and `frozen` the base.
    `teacher`: the arrays of a teacher held by the step (gold_jax.teacher.colocated.StepTeacher), added to
    each micro-batch; a colocated teacher's forward runs here, on the micro-batch it scores."""
    loss_fn = loss_fn or loss_sum
    n_tok = jnp.maximum(batch["completion_mask"].astype(jnp.float32).sum(), 1.0)

    def f(p, mb):
        model = _model(graphdef, p, frozen, spec.dtype, dropout_key)
        mb = teacher_fields(teacher_graphdef, teacher, mb)
        return _split_aux(loss_fn(model, mb, spec, mesh), n_tok)

    vg = jax.value_and_grad(f, has_aux=True)
    if n_micro == 1:
        (loss, aux), grads = vg(params, batch)
    else:
        micro = _micro(batch, n_micro)

        def body(carry, mb):
            l_acc, g_acc, a_acc = carry
            (l, a), g = vg(params, mb)
            return (l_acc + l, jax.tree.map(jnp.add, g_acc, g), _add_aux(a_acc, a)), None
        zeros = jax.tree.map(jnp.zeros_like, params)
        aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                            jax.eval_shape(f, params, jax.tree.map(lambda x: x[0], micro))[1])
        (loss, grads, aux), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros, aux0), micro)
    return (loss, grads, n_tok, aux) if with_aux else (loss, grads, n_tok)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: Any, tx: optax.GradientTransformation,
               schedule: optax.Schedule, spec: LossSpec, n_micro: int, mesh: Mesh | None = None,
               loss_fn: Callable | None = None, frozen: Any = None,
               dropout_seed: int | None = None, teacher: Any = None,
               teacher_graphdef: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
    key = None if dropout_seed is None else jax.random.fold_in(jax.random.key(dropout_seed), state.step)
    with activation_mesh(mesh):   # the model pins its activations to the step's mesh (sharding/activations.py)
        loss, grads, n_tok, aux = _grads_loss_aux(graphdef, state.params, batch, spec, n_micro, mesh, loss_fn,
                                                  frozen, key, teacher, teacher_graphdef)
    gnorm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # A non-finite step is never applied: keep the old parameters and optimizer state.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = TrainState(keep(new_params, state.params), keep(new_opt, state.opt_state),
                           state.step + finite.astype(jnp.int32), state.skipped + (~finite).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": gnorm, "lr": schedule(state.step), "skipped": (~finite).astype(jnp.int32),
               "n_tokens": n_tok}
    if aux:   # H8: per-group losses, diagnostics, importance ratio (gold_jax.losses.objective)
        from gold_jax.losses.objective import reduce_aux
        metrics.update({f"aux/{k}": v for k, v in reduce_aux(aux).items()})
    return new_state, metrics


def eval_loss(params: Any, batch: dict[str, jax.Array], *, graphdef: Any, spec: LossSpec,
              mesh: Mesh | None = None, frozen: Any = None, teacher: Any = None,
              teacher_graphdef: Any = None) -> tuple[jax.Array, jax.Array]:
    """(sum, n_tokens) of the JSD on a batch: validation (LoRA dropout off)."""
    model = _model(graphdef, params, frozen, spec.dtype)
    if frozen is not None:
        model.eval()
    n = batch["completion_mask"].astype(jnp.float32).sum()
    with activation_mesh(mesh):
        return loss_sum(model, teacher_fields(teacher_graphdef, teacher, batch), spec, mesh, objective=False), n


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.shape)))


def state_shardings(state: TrainState) -> Any:
    return jax.tree.map(lambda x: x.sharding, state)


def jit_train_step(state: TrainState, *, mesh: Mesh, frozen: Any = None, teacher: StepTeacher | None = None,
                   **kw: Any) -> Callable:
    """jit with the state's own shardings in and out, donating the old state.

    A LoRA student's `frozen` base weights and a `teacher` held by the step (a colocated model,
    or a remote teacher's head) go in as separate, non-donated arguments with their own shardings."""
    shard = state_shardings(state)
    held = {k: v for k, v in (("frozen", frozen), ("teacher", None if teacher is None else teacher.arrays))
            if v is not None}
    if teacher is not None:
        kw["teacher_graphdef"] = teacher.graphdef
    if held:
        def fn_held(s, b, x):
            return train_step(s, b, mesh=mesh, **x, **kw)
        jitted = jax.jit(fn_held, in_shardings=(shard, batch_sharding(mesh), state_shardings(held)),
                         out_shardings=(shard, None), donate_argnums=(0,))
        return lambda s, b: jitted(s, b, held)
    def fn(s, b):
        return train_step(s, b, mesh=mesh, **kw)
    return jax.jit(fn, in_shardings=(shard, batch_sharding(mesh)), out_shardings=(shard, None),
                   donate_argnums=(0,))

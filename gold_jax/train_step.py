"""The jit-compiled GOLD update: student forward, JSD loss, grads, clipping, optax.

Pure functions only; the host loop (trainer.py) owns every bit of state.
The loss is a *sum* over completion tokens divided by the number of completion
tokens in the whole step (all micro-batches), so gradient accumulation over
micro-batches gives the same gradient as one big batch.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


class TrainState(NamedTuple):
    params: Any          # nnx.State, float32 master weights
    opt_state: Any       # optax state (float32)
    step: jax.Array      # number of applied updates (skipped steps do not count)
    skipped: jax.Array   # number of skipped (non-finite) steps


@dataclasses.dataclass(frozen=True)
class LossSpec:
    impl: str = "topk"           # topk | fused | vocab_parallel | dense
    beta: float = 0.5
    temperature: float = 0.9
    mode: str = "tail"           # top-k: tail bucket or renormalize
    chunk_size: int = 256
    dtype: str = "float32"       # compute dtype of the student forward
    vocab_size: int | None = None  # tokenizer size: logit columns at or past it are embedding padding


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
        raise ValueError(f"optimizer.schedule={opt_cfg.schedule!r}: must be cosine, linear or constant")
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def make_optimizer(opt_cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
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


def loss_sum(model: nnx.Module, batch: dict[str, jax.Array], spec: LossSpec, mesh: Mesh | None) -> jax.Array:
    """Sum of per-token JSD over completion tokens (mask = 1) of one micro-batch."""
    from gold_jax import losses
    r = batch["completion_mask"].shape[1]
    p = batch["input_ids"].shape[1] - r
    # The distribution that predicts completion token j sits at position P-1+j (gold_jax.types).
    h = model.hidden(batch["input_ids"], batch["attention_mask"])[:, p - 1:p + r - 1]
    mask = batch["completion_mask"].astype(jnp.float32)
    kw = dict(beta=spec.beta, temperature=spec.temperature, reduction="sum", vocab_size=spec.vocab_size)
    t_lp = batch["teacher_logprobs"]
    width = model.config.vocab_size
    if "teacher_ids" not in batch and t_lp.shape[-1] < width:
        # Full teacher rows cover the tokenizer's ids; the student's padded embedding rows get -inf.
        t_lp = jnp.pad(t_lp, [(0, 0)] * (t_lp.ndim - 1) + [(0, width - t_lp.shape[-1])], constant_values=-jnp.inf)
    if spec.impl == "fused":
        dense = "teacher_ids" not in batch
        return losses.fused_jsd(
            h, model.lm_head_weight().astype(h.dtype), None if dense else t_lp, batch.get("teacher_ids"), mask,
            mode="dense" if dense else spec.mode, teacher_logits=t_lp * spec.temperature if dense else None, chunk_size=spec.chunk_size,
            teacher_logmass=batch.get("teacher_logmass"), **kw)
    logits = model.logits_from_hidden(h)
    if spec.impl == "dense":
        # Full teacher rows arrive as log-probs at temperature T: pass them as logits at T=1 scale.
        return losses.generalized_jsd(logits, t_lp * spec.temperature, mask, **kw)
    if spec.impl == "vocab_parallel":
        return losses.vocab_parallel_topk_jsd(logits, t_lp, batch["teacher_ids"], mask, mode=spec.mode,
                                              teacher_logmass=batch.get("teacher_logmass"), mesh=mesh, **kw)
    return losses.topk_jsd(logits, t_lp, batch["teacher_ids"], mask, mode=spec.mode,
                           teacher_logmass=batch.get("teacher_logmass"), **kw)


def _micro(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """[B, ...] -> [n, B/n, ...] with strided rows, so every micro-batch spans all batch shards."""
    return {k: jnp.swapaxes(v.reshape(v.shape[0] // n, n, *v.shape[1:]), 0, 1) for k, v in batch.items()}


def grads_and_loss(graphdef: Any, params: Any, batch: dict[str, jax.Array], spec: LossSpec,
                   n_micro: int, mesh: Mesh | None = None,
                   loss_fn: Callable | None = None) -> tuple[jax.Array, Any, jax.Array]:
    """(loss, grads, n_tokens): mean JSD over all completion tokens of the step and its gradient."""
    loss_fn = loss_fn or loss_sum
    n_tok = jnp.maximum(batch["completion_mask"].astype(jnp.float32).sum(), 1.0)

    def f(p, mb):
        model = nnx.merge(graphdef, _cast(p, spec.dtype))
        return loss_fn(model, mb, spec, mesh) / n_tok

    vg = jax.value_and_grad(f)
    if n_micro == 1:
        loss, grads = vg(params, batch)
    else:
        def body(carry, mb):
            l_acc, g_acc = carry
            l, g = vg(params, mb)
            return (l_acc + l, jax.tree.map(jnp.add, g_acc, g)), None
        zeros = jax.tree.map(jnp.zeros_like, params)
        (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), _micro(batch, n_micro))
    return loss, grads, n_tok


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: Any, tx: optax.GradientTransformation,
               schedule: optax.Schedule, spec: LossSpec, n_micro: int, mesh: Mesh | None = None,
               loss_fn: Callable | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    loss, grads, n_tok = grads_and_loss(graphdef, state.params, batch, spec, n_micro, mesh, loss_fn)
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
    return new_state, metrics


def eval_loss(params: Any, batch: dict[str, jax.Array], *, graphdef: Any, spec: LossSpec,
              mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum, n_tokens) of the JSD on a batch: validation."""
    model = nnx.merge(graphdef, _cast(params, spec.dtype))
    return loss_sum(model, batch, spec, mesh), batch["completion_mask"].astype(jnp.float32).sum()


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.shape)))


def state_shardings(state: TrainState) -> Any:
    return jax.tree.map(lambda x: x.sharding, state)


def jit_train_step(state: TrainState, *, mesh: Mesh, **kw: Any) -> Callable:
    """jit with the state's own shardings in and out, donating the old state."""
    shard = state_shardings(state)
    def fn(s, b):
        return train_step(s, b, mesh=mesh, **kw)
    return jax.jit(fn, in_shardings=(shard, batch_sharding(mesh)), out_shardings=(shard, None),
                   donate_argnums=(0,))

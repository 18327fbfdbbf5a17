"""The GOLD host loop: λ coin, schedulers, teacher futures, updates, logging, checkpoints.

Schedulers, with θ_t the parameters after t updates and s the staleness
(sync 0, one_step_off 1, two_step_off 2): the batch for step t is generated
with θ_max(0, t-s). With s > 0 the batch for step t+s is produced right after
update t is dispatched (JAX dispatch is asynchronous), so generation and
teacher scoring overlap the update; with disjoint rollout devices they run
truly in parallel. Checkpoints hold the queued batches with their teacher
scores, so a resume trains on exactly the batches the killed run would have.

Step numbers: step t is the t-th update; metrics, completions, evaluations
and checkpoints written after it all carry t (evaluation before any update: 0).
"""
from __future__ import annotations

import collections
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from gold_jax import components, config as config_lib
from gold_jax.onpolicy import opd_metrics
from gold_jax.batches import END_OF_DATA, BatchProducer, PendingBatch, seq_from_data, train_arrays, unaligned_counts
from gold_jax.checkpoint import Checkpointer
from gold_jax.data import iterator_state_from_json, iterator_state_to_json
from gold_jax.data.pipeline import iterate
from gold_jax.fingerprint import tokenizer_size
from gold_jax.metrics import MetricsWriter, mfu
from gold_jax.models.flops import flops_per_token
from gold_jax.train_step import LossSpec, batch_sharding, init_state, jit_train_step, make_optimizer, eval_loss


def loss_spec(cfg: ml_collections.ConfigDict, mesh: Any, vocab_size: int, cross: Any = None) -> LossSpec:
    """`cross`: the teacher handle's CrossSpec when its tokenizer differs (H10, issue 15), else None."""
    from gold_jax.losses import registry
    signal = registry.teacher_signal(cfg.gold.top_k, cfg.gold.teacher_signal, cfg.teacher.mode, cross=cross is not None)
    impl = registry.resolve_impl(cfg.loss.impl, signal, mesh.shape["tensor"])
    if impl == "uld" and cross is None:
        raise ValueError("config.loss.impl='uld': the teacher shares the student's tokenizer; use loss.impl='auto'")
    dtype = config_lib.resolve_dtype(cfg.model.dtype, jax.devices()[0].platform)
    g = cfg.gold
    return LossSpec(impl=impl, beta=float(g.beta), temperature=float(g.temperature),
                    mode=g.topk_mode, chunk_size=int(cfg.loss.chunk_size), dtype=dtype, vocab_size=vocab_size,
                    # H8 (issue 14): the OPD family, importance correction, per-row λ, diagnostics.
                    loss=g.loss, opd_coef=float(g.opd_coef), opd_offpolicy_weight=float(g.opd_offpolicy_weight),
                    importance_correction=bool(g.importance_correction), importance_cap=float(g.importance_cap),
                    diagnostics=bool(g.diagnostics), always_on_policy=float(g.lmbda) == 1.0,
                    per_row=g.lmbda_granularity == "sample",
                    **({} if cross is None else _cross_loss(g, cross)))


def _cross_loss(g: Any, cross: Any) -> dict[str, Any]:
    from gold_jax.crosstok.request import loss_settings   # H10: TRL's uld_* keys + the run's VocabMap
    return loss_settings(g, cross.vocab_map)


def _global(mesh: Any, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over the batch axes."""
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, v) for k, v in arrays.items()}


# A copy of the parameters for the rollout engine and evaluation: the train step donates the state's buffers.
_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


class Trainer:
    """Owns every piece of run state; `run()` trains to the end and returns the last metrics.

    State: `state` (params, optimizer) and `step` (updates done); `queue` holds batches made ahead
    for the off-policy schedulers, `next_step` the step whose batch is made next; `producer`
    owns the data iterator, the λ RNG, the rollout engine and the teacher handle.
    """

    def __init__(self, cfg: ml_collections.ConfigDict):
        config_lib.validate(cfg, len(jax.devices()))
        self.cfg = cfg
        try:
            self._build(cfg)
        except BaseException:
            self.close()   # the embedded teacher and client threads must not outlive a failed start
            raise

    def _build(self, cfg: ml_collections.ConfigDict) -> None:
        demo = components.resolve_demo(cfg)
        self.run_dir = config_lib.expand(cfg.run_dir)
        components.write_config(cfg, self.run_dir)
        self.devices = components.make_devices(cfg)
        model, self.tokenizer = components.load_student(cfg, self.mesh)
        self.model_config = model.config
        self.teacher = components.connect_teacher(cfg, model, self.tokenizer, self.mesh)
        train_ds = components.make_data(cfg, self.tokenizer)
        self.val_data = components.make_data(cfg, self.tokenizer, "val") if cfg.data.val_files else None
        t = cfg.trainer
        self.total_steps = len(train_ds) if t.max_steps == -1 else min(t.max_steps, len(train_ds))
        if self.total_steps < 1:
            raise ValueError("config.data.train_files yield no full batch of config.trainer.global_batch_size rows")
        # H9: a LoRA student (model.lora.rank > 0) trains its adapters only; the base is frozen and un-donated.
        from gold_jax.models import lora as lora_lib
        self.lora = lora_lib.student_from_config(cfg, model, self.mesh)
        if self.lora is None:
            self.graphdef, params = nnx.split(model)
            frozen = dropout_seed = None
        else:
            self.graphdef, params, frozen = self.lora.graphdef, self.lora.adapters, self.lora.frozen
            dropout_seed = int(cfg.seed) if self.lora.spec.dropout > 0 else None
        tx, schedule = make_optimizer(cfg.optimizer, self.total_steps)
        self.state = init_state(params, tx)
        spec = loss_spec(cfg, self.mesh, tokenizer_size(self.tokenizer), cross=getattr(self.teacher, "cross", None))
        # H7: a teacher held by the step (colocated model, or a remote teacher's head): a non-donated argument.
        st = getattr(self.teacher, "step_teacher", None)
        t_arrays, t_graph = (None, None) if st is None else (st.arrays, st.graphdef)
        self.step_fn = jit_train_step(self.state, mesh=self.mesh, graphdef=self.graphdef, tx=tx,
                                      schedule=schedule, spec=spec, n_micro=t.grad_accum_steps,
                                      frozen=frozen, dropout_seed=dropout_seed, teacher=st)
        _eval = jax.jit(lambda p, f, ta, b: eval_loss(p, b, graphdef=self.graphdef, spec=spec, mesh=self.mesh,
                                                      frozen=f, teacher=ta, teacher_graphdef=t_graph))
        self.eval_fn = lambda p, b: _eval(p, frozen, t_arrays, b)
        # Engines get their own copy of θ_0: the first update donates the state's buffers.
        engine = components.make_rollout_engine(cfg, self._student_copy(), self.tokenizer, self.devices)
        rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), 1]))
        self.producer = BatchProducer(cfg, iterate(train_ds, cfg.data), engine, self.teacher, rng)
        self.queue: collections.deque[PendingBatch] = collections.deque()
        self.step = self.n_on_policy = 0
        self.n_rows_on = self.n_rows = 0   # H8: on-policy rows / rows trained (gold/on_policy_ratio counts rows)
        self.next_step = 0        # the step whose batch is produced next (batches are made in step order)
        self.engine_version = 0   # the step whose weights the rollout engine holds
        self.ckpt = Checkpointer(os.path.join(self.run_dir, "checkpoints"), keep=cfg.checkpoint.keep) \
            if cfg.checkpoint.enabled else None
        resumed = self._maybe_resume()
        # Rows past the restored step (a run killed after logging them) are dropped, so each step appears once.
        self.writer = MetricsWriter(self.run_dir, total_steps=self.total_steps, initial_step=self.step,
                                    keep_through=self.step if resumed else -1, tensorboard=t.tensorboard,
                                    progress_bar=t.progress_bar, enabled=jax.process_index() == 0)
        self.hooks = components.make_eval_hooks(cfg, demo, self._student_copy(), self.tokenizer, self.run_dir)

    @property
    def mesh(self) -> Any:
        return self.devices.mesh

    @property
    def engine(self) -> Any:
        return self.producer.engine

    def _student_copy(self) -> nnx.Module:
        if self.lora is not None:   # the base with the adapters folded in, merged under jit (new buffers)
            return self.lora.merged_model(self.state.params)
        return nnx.merge(self.graphdef, _copy(self.state.params))

    # ------------------------------------------------------------------ checkpoints
    def _host_state(self) -> dict[str, Any]:
        return {"step": self.step, "rng": self.producer.rng.bit_generator.state, "n_on_policy": self.n_on_policy,
                "n_done": self.step, "n_rows_on": self.n_rows_on, "n_rows": self.n_rows,
                "data_iter": iterator_state_to_json(self.producer.data_iter.get_state()),
                **({"lora_base": self.lora.base_ref} if self.lora is not None else {})}

    def save(self) -> None:
        if self.ckpt is None:
            return
        for p in self.queue:  # queued batches are saved with their scores
            self.producer.resolve(p)
        self.ckpt.save(self.step, self.state, self._host_state(), [p.to_arrays() for p in self.queue])
        logging.info("checkpoint at step %d in %s", self.step, self.ckpt.directory)

    def _maybe_resume(self) -> bool:
        if self.ckpt is None or not self.cfg.checkpoint.resume or self.ckpt.latest_step() is None:
            return False
        if self.lora is not None:   # H9: adapters only fit the base they were trained on
            from gold_jax.models import lora as lora_lib
            lora_lib.check_base(self.ckpt.restore_host(self.ckpt.latest_step()).get("lora_base"),
                                self.cfg.model.student_path)
        # A corrupt step raises one CorruptCheckpointError naming the step, the file and the step to fall back to.
        self.state, host, pending = self.ckpt.restore(self.ckpt.latest_step(), self.state)
        self.step, self.n_on_policy = host["step"], host["n_on_policy"]
        self.n_rows_on, self.n_rows = host.get("n_rows_on", 0), host.get("n_rows", 0)
        self.producer.rng.bit_generator.state = host["rng"]
        self.producer.data_iter.set_state(iterator_state_from_json(host["data_iter"]))
        self.queue.extend(PendingBatch.from_arrays(d) for d in pending)
        self.next_step = self.step + len(self.queue)
        self.engine_version = -1   # the engine holds θ_0: sync before generating anything
        logging.info("resumed from step %d (%d queued batches)", self.step, len(self.queue))
        return True

    # ------------------------------------------------------------------ the loop
    def _sync(self) -> float:
        if self.engine_version == self.step:
            return 0.0
        if self.engine_version >= 0 and self.step % self.cfg.rollout.sync_every:
            return 0.0
        self.engine_version = self.step
        # A copy: the train step donates the state, the engine must keep its own buffers.
        return float(self.engine.sync_weights(self._student_copy()))

    def _produce(self, step: int) -> float:
        """Queue the batch for `step`; returns its generation seconds (0 at or past the end)."""
        if step >= self.total_steps:
            return 0.0
        pend = self.producer.produce(step)
        if pend is END_OF_DATA:
            logging.warning("the training data ran out after %d batches (config.trainer.num_epochs=%d): "
                            "the run ends at step %d instead of %d", step, self.cfg.trainer.num_epochs, step,
                            self.total_steps)
            self.total_steps = step
            return 0.0
        pend.version = self.engine_version   # H8: the weights that generated it (gold/staleness)
        self.queue.append(pend)
        self.next_step = step + 1
        return pend.gen_time

    def train_one(self) -> dict[str, Any] | None:
        """One update; returns its metrics, or None when no batch is left (end of the data)."""
        t0 = time.perf_counter()
        sync_s = self._sync()
        gen_s, s = 0.0, config_lib.STALENESS[self.cfg.trainer.scheduler]
        # sync: the batch for this step, made now with θ_step. Off-policy schedulers: only at the
        # start (or with an empty queue) are steps step..step+s-1 made here, all with θ_step.
        while self.next_step <= self.step + max(s - 1, 0) and self.next_step < self.total_steps:
            gen_s += self._produce(self.next_step)
        if not self.queue or self.queue[0].step != self.step:
            return None
        pend = self.queue.popleft()
        teacher_s = self.producer.resolve(pend)
        arrays = train_arrays(pend.seq, pend.scores, rows=pend.row_flags(), behaviour=pend.behaviour)
        staleness = self.step - pend.version if pend.version >= 0 else float("nan")
        t_upd = time.perf_counter()
        self.state, met = self.step_fn(self.state, _global(self.mesh, arrays))   # dispatched, not finished
        if s and self.next_step == self.step + s:
            gen_s += self._produce(self.step + s)   # made with θ_step while update `step` runs
        met = jax.device_get(met)
        now = time.perf_counter()
        self.step += 1
        self.n_on_policy += int(pend.on_policy)
        self.n_rows_on += int(pend.global_row_flags().sum())   # HOSTS: the global batch's rows, same on every process
        self.n_rows += int(pend.global_row_flags().size)
        self._log_samples(pend)
        rec = self._record(pend, met, arrays, sync_s, gen_s, teacher_s, now - t_upd, now - t0)
        counts = unaligned_counts(pend.scores)   # H10 (issue 15): cross-tokenizer positions no span covers
        if counts is not None:
            rec["gold/unaligned_frac"] = counts[0] / max(counts[1], 1)
        rec.update(opd_metrics(met, pend, staleness, self.n_rows_on / max(self.n_rows, 1)))
        return rec

    def _record(self, pend, met, arrays, sync_s, gen_s, teacher_s, update_s, step_s) -> dict[str, Any]:
        g, lens = self.cfg.gold, pend.seq.completion_mask.sum(1)
        b, length = arrays["input_ids"].shape
        tps = b * length * jax.process_count() / step_s
        return {"gold/on_policy_ratio": self.n_on_policy / self.step, "gold/beta": g.beta, "gold/lmbda": g.lmbda,
                "gold/temperature": g.temperature, "gold/is_on_policy": float(pend.on_policy),
                "actor/jsd_loss": float(met["loss"]), "actor/grad_norm": float(met["grad_norm"]),
                "actor/lr": float(met["lr"]), "actor/skipped_steps": int(self.state.skipped),
                "response_seq_len/mean": float(lens.mean()), "response_seq_len/max": float(lens.max()),
                "response_seq_len/min": float(lens.min()),
                "perf/mfu/actor": mfu(flops_per_token(self.model_config, length), tps,
                                      self.devices.train[0].device_kind, len(self.devices.train)),
                "perf/tokens_per_s": tps, "timing/gen": gen_s, "timing/teacher": teacher_s,
                "timing/update": update_s, "timing/step": step_s, "timing/sync": sync_s}

    def _log_samples(self, pend: PendingBatch) -> None:
        """Completions of the step just trained, under the same step number as its metrics."""
        every = self.cfg.trainer.log_completions_every
        if not every or self.step % every:
            return
        rows = []
        for i in range(min(self.cfg.trainer.log_completions_n, pend.seq.prompt_ids.shape[0])):
            cm = pend.seq.completion_mask[i] == 1
            tok_lp = pend.scores.token_logprob   # None when the teacher's logits never reach the host
            nll = -float(tok_lp[i][cm].mean()) if cm.any() and tok_lp is not None else float("nan")
            dec = lambda ids: self.tokenizer.decode(ids.tolist(), skip_special_tokens=False)  # noqa: E731
            rows.append({"prompt": dec(pend.seq.prompt_ids[i][pend.seq.prompt_mask[i] == 1]),
                         "completion": dec(pend.seq.completion_ids[i][cm]), "teacher_nll": nll,
                         "on_policy": pend.on_policy})
        self.writer.samples(self.step, rows)

    def evaluate(self) -> dict[str, Any]:
        """Validation JSD on data.val_files (teacher-scored) and the evaluation hooks (demo accuracy)."""
        out: dict[str, Any] = {}
        if self.val_data is not None:
            total = count = 0.0
            for i, data in zip(range(self.cfg.trainer.eval_batches), iterate(self.val_data, self.cfg.data)):
                seq = seq_from_data(data)
                # The same wait-and-resend as training batches: a teacher outage must not end the run.
                scores = self.producer.score_now(seq, f"scoring validation batch {i} at step {self.step}")
                s, n = jax.device_get(self.eval_fn(self.state.params, _global(self.mesh, train_arrays(seq, scores))))
                total, count = total + float(s), count + float(n)
            out["eval/jsd_loss"] = total / max(count, 1.0)
        if self.hooks:
            out.update(self.hooks.evaluate(self._student_copy))
        if out:
            self.writer.write(self.step, out, kind="eval")
        return out

    def run(self) -> dict[str, Any]:
        t, prof = self.cfg.trainer, self.cfg.profile
        last: dict[str, Any] = {}
        profiling = False
        try:
            if self.step == 0 and (t.eval_every or self.hooks):
                self.evaluate()
            while self.step < self.total_steps:
                if self.step == prof.start_step:
                    jax.profiler.start_trace(os.path.join(self.run_dir, "profile"))
                    profiling = True
                rec = self.train_one()
                if rec is None:
                    break
                last = rec
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    self.writer.write(self.step, rec)
                if profiling and self.step >= prof.start_step + prof.num_steps:
                    jax.profiler.stop_trace()
                    profiling = False
                if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                    self.evaluate()
                if self.cfg.checkpoint.every and self.step % self.cfg.checkpoint.every == 0:
                    self.save()
            if self.ckpt is not None and self.ckpt.latest_step() != self.step:
                self.save()
            last.update(self.evaluate())
            self.hooks.end_of_run()
        finally:
            if profiling:
                jax.profiler.stop_trace()
            self.close()
        return last

    def close(self) -> None:
        """Idempotent; also after a failed start (attributes may be missing)."""
        producer = getattr(self, "producer", None)
        for obj in (getattr(self, "hooks", None), getattr(self, "writer", None),
                    producer.engine if producer is not None else None,
                    getattr(self, "teacher", None), getattr(self, "ckpt", None)):
            if obj is not None:
                try:
                    obj.close()
                except Exception as e:  # noqa: BLE001 - closing must not mask the real error
                    logging.warning("closing %s failed: %s", type(obj).__name__, e)

"""The GOLD host loop: λ coin, schedulers, teacher futures, updates, logging, checkpoints.

Schedulers, with θ_t the parameters after t updates and s the staleness
(sync 0, one_step_off 1, two_step_off 2): the batch for step t is generated
with θ_max(0, t-s). With s > 0 the batch for step t+s is produced right after
update t is dispatched (JAX dispatch is asynchronous), so generation and
teacher scoring overlap the update; with disjoint rollout devices they run
truly in parallel. Checkpoints hold the queued batches with their teacher
scores, so a resume trains on exactly the batches the killed run would have.
"""
from __future__ import annotations

import collections
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from gold_jax import components, config as config_lib
from gold_jax.batches import BatchProducer, PendingBatch, seq_from_data, train_arrays
from gold_jax.checkpoint import Checkpointer
from gold_jax.data.pipeline import iterate
from gold_jax.metrics import MetricsWriter, mfu
from gold_jax.models.flops import flops_per_token
from gold_jax.train_step import LossSpec, batch_sharding, init_state, jit_train_step, make_optimizer, eval_loss


def loss_spec(cfg: ml_collections.ConfigDict, mesh: Any, vocab_size: int) -> LossSpec:
    from gold_jax.losses import registry
    impl = registry.resolve_impl(cfg.loss.impl, registry.teacher_signal(cfg.gold.top_k), mesh.shape["tensor"])
    dtype = config_lib.resolve_dtype(cfg.model.dtype, jax.devices()[0].platform)
    return LossSpec(impl=impl, beta=float(cfg.gold.beta), temperature=float(cfg.gold.temperature),
                    mode=cfg.gold.topk_mode, chunk_size=int(cfg.loss.chunk_size), dtype=dtype, vocab_size=vocab_size)


def _global(mesh: Any, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over the batch axes."""
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, v) for k, v in arrays.items()}


class Trainer:
    """Owns every piece of run state; `run()` trains to the end and returns the last metrics."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        config_lib.validate(cfg, len(jax.devices()))
        self.cfg = cfg
        try:
            self._build(cfg)
        except BaseException:
            self.close()   # the embedded teacher and client threads must not outlive a failed start
            raise

    def _build(self, cfg: ml_collections.ConfigDict) -> None:
        self.demo = components.resolve_demo(cfg)
        self.run_dir = config_lib.expand(cfg.run_dir)
        components.write_config(cfg, self.run_dir)
        self.devices = components.make_devices(cfg)
        self.mesh = self.devices.mesh
        self.model, self.tokenizer = components.load_student(cfg, self.mesh)
        self.teacher, self.local_teacher = components.connect_teacher(cfg, self.model, self.tokenizer)
        self.scorer = self.teacher
        if cfg.teacher.cache_dir:
            from gold_jax.teacher.cache import CachedScorer
            self.scorer = CachedScorer(self.teacher, config_lib.expand(cfg.teacher.cache_dir))
        train_ds = components.make_data(cfg, self.tokenizer)
        self.data_iter, n_batches = iterate(train_ds, cfg.data), len(train_ds)
        self._val_ds = components.make_data(cfg, self.tokenizer, "val") if cfg.data.val_files else None
        t = cfg.trainer
        self.total_steps = n_batches if t.max_steps == -1 else min(t.max_steps, n_batches)
        if self.total_steps < 1:
            raise ValueError("config.data.train_files yield no full batch of config.trainer.global_batch_size rows")
        self.graphdef, params = nnx.split(self.model)
        self.tx, self.schedule = make_optimizer(cfg.optimizer, self.total_steps)
        self.state = init_state(params, self.tx)
        from gold_jax.fingerprint import tokenizer_size
        self.spec = loss_spec(cfg, self.mesh, tokenizer_size(self.tokenizer))
        self.step_fn = jit_train_step(self.state, mesh=self.mesh, graphdef=self.graphdef, tx=self.tx,
                                      schedule=self.schedule, spec=self.spec, n_micro=t.grad_accum_steps)
        self._copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
        # Engines get their own copy of θ_0: the first update donates the state's buffers.
        self.engine = components.make_rollout_engine(cfg, self._student_copy(), self.tokenizer, self.devices)
        self._engine_version = 0
        self.rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), 1]))
        self.producer = BatchProducer(cfg, self.data_iter, self.engine, self.scorer, self.rng)
        self.staleness = config_lib.STALENESS[t.scheduler]
        self.queue: collections.deque[PendingBatch] = collections.deque()
        self.step, self.n_on_policy, self.n_done = 0, 0, 0
        self._next_step = 0   # the step whose batch is produced next (batches are made in step order)
        self.ckpt = Checkpointer(os.path.join(self.run_dir, "checkpoints"), keep=cfg.checkpoint.keep) \
            if cfg.checkpoint.enabled else None
        self._maybe_resume()
        self.writer = MetricsWriter(self.run_dir, total_steps=self.total_steps, initial_step=self.step,
                                    tensorboard=t.tensorboard, progress_bar=t.progress_bar,
                                    enabled=jax.process_index() == 0)
        self.flops_per_token, self._len = None, None
        self._eval = None
        self.evaluator = None
        if self.demo is not None:
            from gold_jax.demo.accuracy_hook import DemoAccuracy
            self.evaluator = DemoAccuracy(self.demo.eval_file, self._student_copy(), self.tokenizer,
                                          n=cfg.demo.eval_n)

    def _student_copy(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self._copy(self.state.params))

    # ------------------------------------------------------------------ checkpoints
    def _host_state(self) -> dict[str, Any]:
        from gold_jax.data import iterator_state_to_json
        return {"step": self.step, "rng": self.rng.bit_generator.state, "n_on_policy": self.n_on_policy,
                "n_done": self.n_done, "data_iter": iterator_state_to_json(self.data_iter.get_state())}

    def save(self) -> None:
        if self.ckpt is None:
            return
        for p in self.queue:  # queued batches are saved with their scores
            self.producer.resolve(p)
        self.ckpt.save(self.step, self.state, self._host_state(), [p.to_arrays() for p in self.queue])
        logging.info("checkpoint at step %d in %s", self.step, self.ckpt.directory)

    def _maybe_resume(self) -> None:
        if self.ckpt is None or not self.cfg.checkpoint.resume or self.ckpt.latest_step() is None:
            return
        from gold_jax.data import iterator_state_from_json
        step = self.ckpt.latest_step()
        try:
            self.state, host, pending = self.ckpt.restore(step, self.state)
        except Exception as e:  # noqa: BLE001 - a clear message beats orbax's internals
            raise RuntimeError(f"cannot restore checkpoint step {step} in {self.ckpt.directory}: {e}; "
                               "delete that step directory to fall back to an earlier one") from e
        self.step, self.n_on_policy, self.n_done = host["step"], host["n_on_policy"], host["n_done"]
        self.rng.bit_generator.state = host["rng"]
        self.data_iter.set_state(iterator_state_from_json(host["data_iter"]))
        self.queue.extend(PendingBatch.from_arrays(d) for d in pending)
        self._next_step = self.step + len(self.queue)
        self._engine_version = -1   # the engine holds θ_0: sync before generating anything
        logging.info("resumed from step %d (%d queued batches)", self.step, len(self.queue))

    # ------------------------------------------------------------------ the loop
    def _sync(self) -> float:
        if self._engine_version == self.step:
            return 0.0
        if self._engine_version >= 0 and self.step % self.cfg.rollout.sync_every:
            return 0.0
        self._engine_version = self.step
        # A copy: the train step donates the state, the engine must keep its own buffers.
        return float(self.engine.sync_weights(self._student_copy()))

    def _produce(self, step: int) -> float:
        """Queue the batch for `step`; returns its generation seconds (0 past the end of the data)."""
        if step >= self.total_steps:
            return 0.0
        try:
            self.queue.append(self.producer.produce(step))
        except StopIteration:
            self.total_steps = step
            return 0.0
        self._next_step = step + 1
        return self.queue[-1].gen_time

    def train_one(self) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        sync_s = self._sync()
        gen_s, s = 0.0, self.staleness
        # sync: the batch for this step, made now with θ_step. Off-policy schedulers: only at the
        # start (or with an empty queue) are steps step..step+s-1 made here, all with θ_step.
        while self._next_step <= self.step + max(s - 1, 0):
            nxt = self._next_step
            gen_s += self._produce(nxt)
            if self._next_step == nxt:   # past the end of the data
                break
        if not self.queue or self.queue[0].step != self.step:
            return None
        pend = self.queue.popleft()
        teacher_s = self.producer.resolve(pend)
        arrays = train_arrays(pend.seq, pend.scores)
        t_upd = time.perf_counter()
        self.state, met = self.step_fn(self.state, _global(self.mesh, arrays))   # dispatched, not finished
        if s and self._next_step == self.step + s:
            gen_s += self._produce(self.step + s)   # made with θ_step while update `step` runs
        met = jax.device_get(met)
        now = time.perf_counter()
        self.n_done += 1
        self.n_on_policy += int(pend.on_policy)
        rec = self._record(pend, met, arrays, sync_s, gen_s, teacher_s, now - t_upd, now - t0)
        self._log_samples(pend)
        self.step += 1
        return rec

    def _record(self, pend, met, arrays, sync_s, gen_s, teacher_s, update_s, step_s) -> dict[str, Any]:
        g, lens = self.cfg.gold, pend.seq.completion_mask.sum(1)
        b, length = arrays["input_ids"].shape
        tokens = b * length * jax.process_count()
        if self.flops_per_token is None or self._len != length:
            self.flops_per_token, self._len = flops_per_token(self.model.config, length), length
        tps = tokens / step_s
        return {"gold/on_policy_ratio": self.n_on_policy / self.n_done, "gold/beta": g.beta, "gold/lmbda": g.lmbda,
                "gold/temperature": g.temperature, "gold/is_on_policy": float(pend.on_policy),
                "actor/jsd_loss": float(met["loss"]), "actor/grad_norm": float(met["grad_norm"]),
                "actor/lr": float(met["lr"]), "actor/skipped_steps": int(self.state.skipped),
                "response_seq_len/mean": float(lens.mean()), "response_seq_len/max": float(lens.max()),
                "response_seq_len/min": float(lens.min()),
                "perf/mfu/actor": mfu(self.flops_per_token, tps, self.devices.train[0].device_kind,
                                      len(self.devices.train)),
                "perf/tokens_per_s": tps, "timing/gen": gen_s, "timing/teacher": teacher_s,
                "timing/update": update_s, "timing/step": step_s, "timing/sync": sync_s}

    def _log_samples(self, pend: PendingBatch) -> None:
        every = self.cfg.trainer.log_completions_every
        if not every or self.step % every:
            return
        rows = []
        for i in range(min(self.cfg.trainer.log_completions_n, pend.seq.prompt_ids.shape[0])):
            cm = pend.seq.completion_mask[i] == 1
            nll = -float(pend.scores.token_logprob[i][cm].mean()) if cm.any() else float("nan")
            dec = lambda ids: self.tokenizer.decode(ids.tolist(), skip_special_tokens=False)  # noqa: E731
            rows.append({"prompt": dec(pend.seq.prompt_ids[i][pend.seq.prompt_mask[i] == 1]),
                         "completion": dec(pend.seq.completion_ids[i][cm]), "teacher_nll": nll,
                         "on_policy": pend.on_policy})
        self.writer.samples(self.step, rows)

    def evaluate(self) -> dict[str, Any]:
        """Validation JSD on data.val_files (teacher-scored) and, for the demo, exact-match accuracy."""
        out: dict[str, Any] = {}
        if self._val_ds is not None:
            if self._eval is None:
                self._eval = jax.jit(lambda p, b: eval_loss(p, b, graphdef=self.graphdef, spec=self.spec,
                                                            mesh=self.mesh))
            it = iterate(self._val_ds, self.cfg.data)
            total = count = 0.0
            for _, data in zip(range(self.cfg.trainer.eval_batches), it):
                seq = seq_from_data(data)
                scores = self.scorer.score(seq, top_k=int(self.cfg.gold.top_k),
                                           temperature=float(self.cfg.gold.temperature)).result()
                s, n = jax.device_get(self._eval(self.state.params, _global(self.mesh, train_arrays(seq, scores))))
                total, count = total + float(s), count + float(n)
            out["eval/jsd_loss"] = total / max(count, 1.0)
        if self.evaluator is not None:
            out.update(self.evaluator(self._student_copy()))
        if out:
            self.writer.write(self.step, out, kind="eval")
        return out

    def run(self) -> dict[str, Any]:
        t, prof = self.cfg.trainer, self.cfg.profile
        crash_at = int(os.environ.get("GOLD_JAX_KILL_AT_STEP", "-1"))  # fault injection for the resume tests
        last: dict[str, Any] = {}
        profiling = False
        try:
            if self.step == 0 and (t.eval_every or self.evaluator is not None):
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
                if self.step == crash_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            if self.ckpt is not None and self.ckpt.latest_step() != self.step:
                self.save()
            last.update(self.evaluate())
            if self.demo is not None and jax.process_index() == 0:
                from gold_jax.demo.plot import plot_run
                self.writer.close()
                logging.info("plot: %s", plot_run(self.run_dir))
        finally:
            if profiling:
                jax.profiler.stop_trace()
            self.close()
        return last

    def close(self) -> None:
        for obj in (getattr(self, "writer", None), getattr(self, "engine", None), getattr(self, "teacher", None),
                    getattr(self, "local_teacher", None), getattr(self, "ckpt", None)):
            if obj is not None:
                try:
                    obj.close()
                except Exception as e:  # noqa: BLE001 - closing must not mask the real error
                    logging.warning("closing %s failed: %s", type(obj).__name__, e)

"""Build what a run needs from its config: devices, meshes, student, teacher, rollout engine, data.

Kept apart from the host loop so that the loop reads as the algorithm and
this file as the wiring. Nothing here is stateful beyond construction.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging
from flax import nnx

from gold_jax import config as config_lib
from gold_jax.data import build_dataset, load_tokenizer
from gold_jax.fingerprint import tokenizer_fingerprint
from gold_jax.models.hf_io import load_pretrained
from gold_jax.rollout import make_engine
from gold_jax.sharding import make_mesh
from gold_jax.teacher import TeacherClient, start_local_teacher
from gold_jax.teacher.cache import CachedScorer
from gold_jax.teacher.handle import TeacherHandle


def maybe_init_distributed(cfg: ml_collections.ConfigDict) -> None:
    """jax.distributed.initialize for multi-host runs (before any device is touched)."""
    from gold_jax import distributed   # H6: initialize, then check every process has the same config
    distributed.initialize(cfg)


def resolve_demo(cfg: ml_collections.ConfigDict) -> Any | None:
    """Fill empty model/data paths with the embedded demo's assets (built on first use)."""
    if cfg.model.student_path and (cfg.model.teacher_path or cfg.teacher.address) and cfg.data.train_files:
        return None
    if cfg.model.student_path or cfg.model.teacher_path or cfg.data.train_files:
        raise ValueError("config.model.student_path, config.model.teacher_path (or config.teacher.address) and "
                         "config.data.train_files must be given together; leave all empty for the embedded demo")
    from gold_jax.demo.build import ensure_demo_assets   # the demo is optional: built on first use
    assets = ensure_demo_assets(config_lib.expand(cfg.demo.cache_dir), preset=cfg.demo.preset,
                                task=cfg.demo.get("task", "sort"))   # issue 18: sort | chain
    if cfg.demo.cross_teacher:   # issue 15: the same task's teacher with another tokenizer (built on first use)
        from gold_jax.demo.cross_build import ensure_cross_assets
        cross = ensure_cross_assets(config_lib.expand(cfg.demo.cache_dir), preset=cfg.demo.preset,
                                    variant=cfg.demo.cross_teacher)
        assets = dataclasses.replace(assets, teacher_dir=cross.teacher_dir,
                                     info={**assets.info, "teacher": cross.info["teacher"]})
    with cfg.unlocked():
        cfg.model.student_path, cfg.model.teacher_path = assets.student_dir, assets.teacher_dir
        cfg.data.train_files, cfg.data.val_files = assets.train_file, assets.val_file
        # The demo's own lengths (configs/gold.py sets them), where the run left data's defaults.
        base = config_lib.base_config().data
        for k in ("max_prompt_length", "max_response_length"):
            want = assets.info.get("data_lengths", {}).get(k, cfg.demo[k])   # the chain task's own
            if want and cfg.data[k] == base[k]:
                cfg.data[k] = want
    return assets


@dataclasses.dataclass
class Devices:
    train: list
    rollout: list          # == train when rollout shares the training devices
    mesh: Any
    rollout_mesh: Any


def guard_vllm_gpu_memory(cfg: ml_collections.ConfigDict, platform: str) -> None:
    """Fail early when a vLLM rollout engine would find no GPU memory left by JAX.

    JAX preallocates 75% of a GPU's memory when its backend starts, and the vLLM engine
    (rollout.engine="vllm") runs on the same GPU and needs rollout.gpu_memory_utilization of it.
    The limit has to be in the environment before JAX starts its backend, so it cannot be set
    from here, only checked: run with e.g. `XLA_PYTHON_CLIENT_MEM_FRACTION=0.5` and
    `--config.rollout.gpu_memory_utilization=0.4` (sum at most 0.95), or with
    `XLA_PYTHON_CLIENT_PREALLOCATE=false`. CPU and TPU are not affected.
    """
    if cfg.rollout.engine != "vllm" or platform not in ("gpu", "cuda", "rocm"):
        return
    env = os.environ
    if env.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() in ("false", "0") \
            or env.get("XLA_PYTHON_CLIENT_ALLOCATOR") == "platform":
        return
    util, frac = float(cfg.rollout.gpu_memory_utilization), env.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    try:
        ok = frac is not None and float(frac) + util <= 0.95
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"rollout.engine='vllm' on {platform}: JAX preallocates {'75%' if frac is None else frac} of GPU memory "
            f"and vLLM needs rollout.gpu_memory_utilization={util:g} of it on the same GPU. Set "
            f"XLA_PYTHON_CLIENT_MEM_FRACTION (e.g. {max(0.95 - util, 0.05):.2f}) so that it plus "
            "rollout.gpu_memory_utilization is at most 0.95, or XLA_PYTHON_CLIENT_PREALLOCATE=false, in the "
            "environment before starting the run (JAX reads it when its backend starts)")


def make_devices(cfg: ml_collections.ConfigDict) -> Devices:
    devs = jax.devices()
    guard_vllm_gpu_memory(cfg, devs[0].platform)
    n_train, n_roll = config_lib.split_devices(cfg, len(devs))
    train = devs[:n_train]
    mesh = make_mesh(cfg.mesh, devices=train)
    if n_roll == 0:
        return Devices(train, train, mesh, mesh)
    roll = devs[n_train:n_train + n_roll]
    # The rollout subset is pure data parallel: sampling needs no fsdp/tensor split at these sizes.
    return Devices(train, roll, mesh, make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=roll))


def load_student(cfg: ml_collections.ConfigDict, mesh: Any) -> tuple[nnx.Module, Any]:
    dtype = config_lib.resolve_dtype(cfg.model.dtype, jax.devices()[0].platform)
    model = load_pretrained(cfg.model.student_path, dtype=dtype, param_dtype=cfg.model.param_dtype, mesh=mesh)
    # H6: fail at start-up, with the parameter names, when the rules leave too much replicated.
    from gold_jax.sharding.replication_check import check_replication
    check_replication(nnx.state(model), mesh, float(cfg.mesh.max_replicated_fraction))
    # H4: load_tokenizer attaches the EOS set (tokenizer + the student's config/generation_config)
    # and picks a pad when the tokenizer ships none; it refuses only a tokenizer without any EOS.
    tokenizer = load_tokenizer(cfg.model.tokenizer_path or cfg.model.student_path, model_dir=cfg.model.student_path)
    return model, tokenizer


def connect_teacher(cfg: ml_collections.ConfigDict, model: nnx.Module, tokenizer: Any,
                    mesh: Any = None) -> TeacherHandle:
    """The run's one teacher handle, checked against the student.

    It hides the embedded server (started when `teacher.address` is empty) and the
    score cache (`teacher.cache_dir`); its close() stops everything it started.
    With teacher.mode="colocated" (H7) no server starts: the handle carries the teacher's
    parameters on `mesh` for the train step (`step_teacher`), and scores nothing on the host.
    """
    if cfg.teacher.mode == "colocated":
        return _colocated_teacher(cfg, tokenizer, mesh)
    local = client = None
    address = cfg.teacher.address
    try:
        if not address:
            local = start_local_teacher(cfg.model.teacher_path, backend=cfg.teacher.backend, port=cfg.teacher.port,
                                        dtype=cfg.teacher.dtype)
            address = local.address
        client = TeacherClient(address, timeout_s=cfg.teacher.timeout_s, max_retries=cfg.teacher.max_retries,
                               max_in_flight=cfg.teacher.max_in_flight)
        fp = tokenizer_fingerprint(tokenizer)
        if not cfg.gold.get("cross_tokenizer", False):
            try:
                _compare_teacher_tokenizer(cfg, tokenizer)   # H4: precise vocabulary differences, EOS/pad warnings
            except ValueError as e:   # H10: the way out is the key
                raise ValueError(f"{e}; set gold.cross_tokenizer=True to distill across tokenizers") from None
        # H10 (issue 15): another tokenizer is refused unless gold.cross_tokenizer; then scores are aligned text.
        info = client.check_student(model.config.vocab_size, fp, cross_tokenizer=bool(cfg.gold.get("cross_tokenizer")))
        cross = _cross_spec(cfg, client, info, model, tokenizer, fp) if info.get("cross") else None
        if cfg.gold.top_k > info["max_top_k"]:
            raise ValueError(f"config.gold.top_k={cfg.gold.top_k} exceeds the teacher's max_top_k={info['max_top_k']}")
        cache = CachedScorer(client, config_lib.expand(cfg.teacher.cache_dir)) if cfg.teacher.cache_dir else None
        from gold_jax.losses import registry
        hidden = registry.teacher_signal(cfg.gold.top_k, cfg.gold.teacher_signal, cfg.teacher.mode) == "hidden"
        step_teacher = _remote_head(cfg, client, info, mesh) if hidden else None
    except BaseException:
        TeacherHandle(client, top_k=0, temperature=1.0, server=local).close()
        raise
    logging.info("teacher %s at %s: %s", info.get("model_name"), address, info)
    temperature = cfg.gold.uld_teacher_temperature if cross is not None else cfg.gold.temperature
    return TeacherHandle(client, top_k=cfg.gold.top_k, temperature=temperature, cache=cache, server=local,
                         signal="hidden" if hidden else "logprobs", step_teacher=step_teacher, cross=cross)


def _cross_spec(cfg: ml_collections.ConfigDict, client: Any, info: dict, model: nnx.Module, tokenizer: Any,
                fp: str) -> Any:
    """H10 (issue 15): the run's cross-tokenizer settings; the teacher's vocabulary is fetched here, once."""
    from gold_jax.crosstok.request import CrossSpec, vocab_map_for
    from gold_jax.data.special_tokens import eos_token_ids
    vm = vocab_map_for(tokenizer, client.vocab(), student_vocab_size=model.config.vocab_size,
                       teacher_vocab_size=info["vocab_size"])
    g = cfg.gold
    logging.info("cross-tokenizer teacher %s: %d of its %d tokens have a student twin (exact string)",
                 info.get("model_name"), vm.n_matched, vm.teacher_vocab_size)
    return CrossSpec(tokenizer, vm, eos_token_ids(tokenizer), strategy=g.uld_token_merge_strategy,
                     skip_student_eos=bool(g.uld_skip_student_eos), skip_teacher_eos=bool(g.uld_skip_teacher_eos),
                     student_fingerprint=fp)


def _remote_head(cfg: ml_collections.ConfigDict, client: Any, info: dict, mesh: Any) -> Any:
    """H7: the teacher's lm head for gold.teacher_signal="hidden", from model.teacher_path or fetched once
    from the server, checked against the checksum the server announces; placed on the training mesh."""
    from gold_jax.teacher.colocated import StepTeacher, place_head
    from gold_jax.teacher.head import check_checksum, head_checksum, load_head
    if not info.get("head_checksum"):
        raise ValueError(f"config.gold.teacher_signal='hidden': the teacher at {client.address} does not serve "
                         "hidden states (it needs the jax backend)")
    path = cfg.model.teacher_path
    if path and os.path.isfile(os.path.join(path, "config.json")):
        head, norm = load_head(path)
        check_checksum(head_checksum(head, norm), info["head_checksum"], f"config.model.teacher_path={path!r}")
    else:
        head, norm = client.head()
    dtype = config_lib.resolve_dtype(cfg.teacher.dtype, jax.devices()[0].platform)
    return StepTeacher(place_head(head, mesh, dtype))


def _colocated_teacher(cfg: ml_collections.ConfigDict, tokenizer: Any, mesh: Any) -> Any:
    """H7: the teacher of model.teacher_path on the training mesh, same tokenizer as the student's."""
    from gold_jax.fingerprint import tokenizer_size
    from gold_jax.teacher.colocated import ColocatedHandle, load_colocated, teacher_dtype
    path = cfg.model.teacher_path
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        theirs = tokenizer_fingerprint(load_tokenizer(path))
        if theirs != tokenizer_fingerprint(tokenizer):
            _compare_teacher_tokenizer(cfg, tokenizer)
            raise ValueError(f"config.model.teacher_path={path!r}: its tokenizer differs from the student's "
                             "(a colocated teacher must share the student's vocabulary)")
    dtype = teacher_dtype(cfg.teacher.dtype, jax.devices()[0].platform)
    step_teacher = load_colocated(path, mesh, dtype, tokenizer_size(tokenizer))
    logging.info("colocated teacher %s (%s) in the train step", path, dtype)
    return ColocatedHandle(step_teacher, model_name=os.path.basename(os.path.normpath(path)))


def _compare_teacher_tokenizer(cfg: ml_collections.ConfigDict, tokenizer: Any) -> None:
    """With a local teacher folder, say exactly how its vocabulary differs (the fingerprint only says that)."""
    from gold_jax.fingerprint import compare_tokenizers
    path = cfg.model.teacher_path
    if not path or not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return
    for w in compare_tokenizers(tokenizer, load_tokenizer(path)):
        logging.warning("teacher tokenizer: %s", w)


def make_rollout_engine(cfg: ml_collections.ConfigDict, model: nnx.Module, tokenizer: Any, devices: Devices) -> Any:
    kw = {}
    if cfg.rollout.engine == "vllm":
        # The engine runs in the student's compute dtype, and reserves KV cache for the run's
        # lengths only (not the checkpoint's max_position_embeddings, often 32k+).
        kw = dict(model_dir=cfg.model.student_path, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                  dtype=config_lib.resolve_dtype(cfg.model.dtype, devices.rollout[0].platform),
                  max_model_len=int(cfg.data.max_prompt_length) + int(cfg.data.max_response_length))
    else:
        kw = dict(mesh=devices.rollout_mesh)
    from gold_jax.data.special_tokens import eos_token_ids
    # H4: sampling stops on any id of the student's EOS set (Llama 3.2 Instruct has three).
    return make_engine(cfg.rollout.engine, model, eos_id=eos_token_ids(tokenizer), pad_id=tokenizer.pad_token_id,
                       **kw)


def make_data(cfg: ml_collections.ConfigDict, tokenizer: Any, split: str = "train") -> Any:
    """This process's batched grain dataset (over all epochs for train, one pass for val).

    Tokenised once; `gold_jax.data.pipeline.iterate(ds, cfg.data)` gives a fresh
    checkpointable iterator, len(ds) the number of global batches.
    """
    kw = dict(split=split, global_batch_size=cfg.trainer.global_batch_size, process_index=jax.process_index(),
              process_count=jax.process_count(), seed=cfg.seed,
              num_epochs=cfg.trainer.num_epochs if split == "train" else 1)
    # H4: training rows need a completion only when off-policy steps train on it (λ < 1, no seq_kd).
    kw["require_response"] = split != "train" or (cfg.gold.lmbda < 1 and not cfg.gold.seq_kd)
    return build_dataset(cfg.data, tokenizer, **kw)[0]   # tokenize_files logs the row accounting


def write_config(cfg: ml_collections.ConfigDict, run_dir: str) -> None:
    if jax.process_index() == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2, default=str)


class EvalHooks:
    """Evaluations beyond the validation JSD, run by the trainer: the demo's accuracy and plot.

    A hook has `evaluate(student) -> dict` (metrics for the current weights; `student()`
    builds a copy of the model on demand), `end_of_run()` and `close()`.
    """

    def __init__(self, hooks: list[Any]):
        self.hooks = hooks

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def evaluate(self, student: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for h in self.hooks:
            out.update(h.evaluate(student))
        return out

    def end_of_run(self) -> None:
        for h in self.hooks:
            h.end_of_run()

    def close(self) -> None:
        for h in self.hooks:
            try:
                h.close()
            except Exception as e:  # noqa: BLE001 - closing must not mask the real error
                logging.warning("closing %s failed: %s", type(h).__name__, e)
        self.hooks = []


def make_eval_hooks(cfg: ml_collections.ConfigDict, demo: Any, model: nnx.Module, tokenizer: Any,
                    run_dir: str) -> EvalHooks:
    """The demo run's hooks: exact-match accuracy at each evaluation, metrics.png at the end (process 0)."""
    if demo is None:
        return EvalHooks([])
    from gold_jax.demo.accuracy_hook import DemoAccuracy   # the demo is optional (matplotlib, parquet task)
    from gold_jax.demo.plot import PlotHook
    hooks: list[Any] = [DemoAccuracy(demo.eval_file, model, tokenizer, n=cfg.demo.eval_n)]
    if jax.process_index() == 0:
        # issue 18: the teacher's accuracy (assets.json) is the plot's reference line
        hooks.append(PlotHook(run_dir, teacher_accuracy=demo.info.get("teacher", {}).get("accuracy")))
    return EvalHooks(hooks)

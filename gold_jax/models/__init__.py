"""Flax NNX decoder for the Llama / Qwen2 / Qwen3 family, with HF checkpoints in and out."""
from __future__ import annotations

from flax import nnx

from gold_jax.models.config import ModelConfig
from gold_jax.models.decoder import Decoder, default_positions
from gold_jax.models.flops import flops_per_token
from gold_jax.models.kv_cache import KV_CACHE_AXES, KVCache
from gold_jax.models import hf_io, partition  # noqa: E402  (submodules, for attribute access)


def init_model(cfg: ModelConfig, seed: int = 0) -> Decoder:
    """A randomly initialised Decoder (N(0, 0.02) weights, unit norms, zero biases)."""
    return Decoder(cfg, rngs=nnx.Rngs(params=seed))


__all__ = ["ModelConfig", "Decoder", "KVCache", "KV_CACHE_AXES", "init_model", "default_positions",
           "flops_per_token", "hf_io", "partition"]

"""Training FLOPs per token, for MFU (PaLM appendix B convention)."""
from __future__ import annotations

from gold_jax.models.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul: all projections plus the LM head.

    The embedding lookup is a gather, not a matmul, so an untied input embedding
    is not counted; a tied one is counted once, as the LM head.
    """
    h, n, kv, d, i = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    attn = h * n * d * 2 + h * kv * d * 2          # q, o and k, v
    mlp = 3 * h * i                                  # gate, up, down
    return cfg.num_layers * (attn + mlp) + h * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 * N_matmul + 12 * layers * heads * head_dim * seq_len (forward + backward).

    The attention term counts q.k and p.v over the full `seq_len` keys (no causal
    halving), as PaLM and maxtext do, so MFU figures compare across codebases.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return float(6 * matmul_params(cfg) + attn)

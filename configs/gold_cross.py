r"""The demo with a teacher of ANOTHER tokenizer: cross-tokenizer distillation (issue 15, TRL GOLD's ULD / hybrid).

    python -m gold_jax.train --config configs/gold_cross.py
    python -m gold_jax.train --config configs/gold_cross.py --config.trainer.max_steps=200
    python -m gold_jax.train --config configs/gold_cross.py:uld        # ULD only (no hybrid JSD part)
    python -m gold_jax.train --config configs/gold_cross.py:runlocal   # laptop-sized
    python -m gold_jax.train --config configs/gold_cross.py:sentencepiece   # the hard teacher tokenizer

Everything else is configs/gold.py's demo: the same sorting task, data and
warmed-up student (byte-level BPE, Qwen style). The teacher
(gold_jax/demo/cross_build.py, built on first use next to the demo's assets)
was trained on the same task with another tokenizer (demo.cross_teacher):

- "bytelevel" (default): byte-level BPE like the student's with other merges,
  ids and a larger vocabulary (1028 tokens vs 288): the regime of real
  cross-family pairs (Qwen2.5 <-> Llama 3), where common tokens are spelled
  the same;
- "sentencepiece" (`:sentencepiece`): a SentencePiece-style byte-fallback BPE
  whose merges span two digits (462 tokens), so its tokens and the student's
  rarely coincide (39 shared strings): the hard case.

The teacher server tokenizes each text with its own tokenizer, aligns the two
token streams by byte offsets and returns its top-k at student positions; the
loss is TRL GOLD's hybrid (generalized JSD on the tokens both vocabularies
spell the same, ULD on the rest). Unaligned positions are masked and counted
in gold/unaligned_frac.
"""
from configs.gold import get_config as gold_config


def get_config(arg: str | None = None):
    args = set((arg or "").split(",")) - {""}
    unknown = args - {"runlocal", "uld", "sentencepiece"}
    if unknown:
        raise ValueError(f"configs/gold_cross.py: unknown argument(s) {sorted(unknown)}; "
                         "known: runlocal, uld, sentencepiece")
    c = gold_config("runlocal" if "runlocal" in args else None)
    c.run_dir = "runs/gold_cross"
    # the demo teacher with another tokenizer (gold_jax/demo/cross_build.py)
    c.demo.cross_teacher = "sentencepiece" if "sentencepiece" in args else "bytelevel"
    c.gold.cross_tokenizer = True        # allow a teacher whose tokenizer differs; the loss becomes ULD / hybrid
    c.gold.uld_use_hybrid_loss = "uld" not in args   # JSD (gold.beta) on shared tokens + ULD on the rest
    c.gold.uld_token_merge_strategy = "observed"      # a span's probability: first position x later conditionals
    return c

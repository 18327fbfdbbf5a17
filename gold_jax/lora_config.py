"""config.model.lora's names and checks, without jax (config.validate must stay import-light)."""
from __future__ import annotations

from typing import Any

# Our target names -> the HF/PEFT module names they adapt.
PEFT_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                "up": "up_proj", "down": "down_proj", "lm_head": "lm_head", "embed": "embed_tokens"}
TARGETS = tuple(PEFT_MODULES)


def parse_targets(targets: Any) -> list[str]:
    """'q,k,v' or a sequence of names -> list of names (checked by config_errors)."""
    if isinstance(targets, str):
        return [t.strip() for t in targets.split(",") if t.strip()]
    return [str(t) for t in targets]


def config_errors(lc: Any) -> list[tuple[str, Any, str]]:
    """(key, value, problem) for every bad field of config.model.lora; [] when fine or off."""
    out = []
    if not isinstance(lc.rank, int) or lc.rank < 0:
        out.append(("model.lora.rank", lc.rank, "must be an int >= 0 (0 = LoRA off)"))
        return out
    if lc.rank == 0:
        return out
    if not lc.alpha > 0:
        out.append(("model.lora.alpha", lc.alpha, "must be > 0 (the update is scaled by alpha / rank)"))
    if not 0.0 <= lc.dropout < 1.0:
        out.append(("model.lora.dropout", lc.dropout, "must be in [0, 1)"))
    names = parse_targets(lc.targets)
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        out.append(("model.lora.targets", lc.targets, f"unknown target(s) {bad}; choose from {TARGETS}"
                    if bad else f"must name at least one of {TARGETS}"))
    elif len(set(names)) != len(names):
        out.append(("model.lora.targets", lc.targets, "names a target twice"))
    return out

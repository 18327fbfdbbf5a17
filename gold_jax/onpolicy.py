"""Host-side pieces of on-policy batches: the λ coins per batch or per row, mixing rows, the behaviour log-probs.

`gold.lmbda_granularity="batch"` draws one coin per batch (one `rng.random()`,
the draw sequence of every earlier run); `"sample"` draws one coin per row
(`rng.random(B)`), so a batch holds student samples and dataset completions
side by side and `gold/on_policy_ratio` counts rows. The coins come from the
producer's RNG, whose state is checkpointed: a resumed run draws the same coins.
With several processes the RNG is the same on every process (seeded from the
config's seed, advanced by the same draws): the row coins are drawn for the
global batch and each process keeps its slice, and `decision` is what
distributed.StepCheck compares across processes before each batch is made.
"""
from __future__ import annotations

import numpy as np

from gold_jax.types import SequenceBatch

GRANULARITIES = ("batch", "sample")


def _layout() -> tuple[int, int]:
    import jax
    return jax.process_index(), jax.process_count()


def coin(rng: np.random.Generator, lmbda: float) -> bool:
    """The batch's λ coin (gold.lmbda_granularity="batch"): one draw of the shared RNG."""
    return bool(rng.random() < lmbda)


def draw_global_rows(rng: np.random.Generator, lmbda: float, n_local: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row coins (gold.lmbda_granularity="sample") for the whole global batch: (this process's rows, all rows).

    Every process draws all n_local x processes coins from the same RNG and keeps its slice (the
    data pipeline gives process p global rows [p * n_local, (p + 1) * n_local)), so the coins, the
    RNG state and the batch-level decisions are the same on every process and in every process
    layout. One process: the draws of `draw_rows(rng, lmbda, "sample", n_local)`.
    """
    p, count = _layout()
    all_rows = rng.random(n_local * count) < lmbda
    return all_rows[p * n_local:(p + 1) * n_local], all_rows


def row_offset(n_local: int) -> int:
    """Global batch index of this process's first row (the rollout engines key their sampling on it)."""
    return _layout()[0] * n_local


def decision(step: int, on_policy: bool | None, all_rows: np.ndarray | None, end_of_data: bool,
             rng: np.random.Generator) -> dict[str, int]:
    """What every process must agree on before it makes the batch for `step` (distributed.StepCheck)."""
    import hashlib
    digest = lambda b: int.from_bytes(hashlib.sha256(b).digest()[:4], "little") >> 1  # noqa: E731
    return {"step": int(step), "end_of_data": int(end_of_data),
            "coin": -1 if on_policy is None else int(on_policy),
            "row_coins": 0 if all_rows is None else digest(np.packbits(np.asarray(all_rows, bool)).tobytes()),
            "rng": digest(repr(rng.bit_generator.state).encode())}


def draw_rows(rng: np.random.Generator, lmbda: float, granularity: str, n_rows: int) -> np.ndarray:
    """Boolean [n_rows]: which rows are student-generated."""
    if granularity == "batch":
        return np.full((n_rows,), bool(rng.random() < lmbda))
    if granularity == "sample":
        return rng.random(n_rows) < lmbda
    raise ValueError(f"gold.lmbda_granularity={granularity!r}: must be one of {GRANULARITIES}")


def _pad_to(x: np.ndarray, width: int, value) -> np.ndarray:
    if x.shape[1] > width:
        raise ValueError(f"completions of width {x.shape[1]} do not fit the batch's {width} columns")
    return np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=value)


def mix_rows(on_rows: np.ndarray, generated: SequenceBatch, data: SequenceBatch) -> SequenceBatch:
    """Rows of `generated` where on_rows, else the dataset's; same prompts, completions padded to one width."""
    if not np.array_equal(generated.prompt_ids, data.prompt_ids):
        raise ValueError("generated and dataset rows must share their prompts")
    width = max(generated.completion_ids.shape[1], data.completion_ids.shape[1])
    pick = on_rows[:, None]
    ids = np.where(pick, _pad_to(generated.completion_ids, width, 0), _pad_to(data.completion_ids, width, 0))
    mask = np.where(pick, _pad_to(generated.completion_mask, width, 0), _pad_to(data.completion_mask, width, 0))
    return SequenceBatch(data.prompt_ids, data.prompt_mask, ids.astype(np.int32), mask.astype(np.int32))


def behaviour_logprobs(on_rows: np.ndarray, logprobs: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """[B, R] float32 sampling log-probs of the student rows (0 elsewhere and where the engine gave none)."""
    out = np.zeros(shape, np.float32)
    if logprobs is not None:
        lp = np.asarray(logprobs, np.float32)
        out[:, :lp.shape[1]] = np.where(on_rows[:, None], lp[:, :shape[1]], 0.0)
    return out


# The train step's aux sums (gold_jax.losses.objective, prefixed "aux/") under their metric names; the
# diagnostics keep theirs (teacher/topk_mass/on_policy, ...).
AUX_METRICS = {"loss/on_policy": "actor/jsd_loss/on_policy", "loss/off_policy": "actor/jsd_loss/off_policy",
               "importance_ratio": "gold/importance_ratio/mean", "importance_ratio_max": "gold/importance_ratio/max",
               "opd/reverse_kl": "actor/opd_reverse_kl"}


def opd_metrics(met: dict, pend, staleness: float, on_policy_ratio: float) -> dict[str, float]:
    """Row-exact λ metrics, gold/staleness (student rows only) and the aux metrics present in this batch.

    A group without a token in this batch (e.g. off-policy rows of an on-policy batch) logs nothing,
    rather than a 0 that would read as a measurement.
    """
    rows = pend.global_row_flags()   # every process logs and counts the global batch's rows
    out = {"gold/on_policy_ratio": float(on_policy_ratio), "gold/is_on_policy": float(rows.mean())}
    if rows.any() and staleness == staleness:
        out["gold/staleness"] = float(staleness)
    for k, v in met.items():
        if not k.startswith("aux/") or k.endswith("#count"):
            continue
        name = k[4:]
        count_key = "aux/importance_ratio#count" if name == "importance_ratio_max" else f"{k}#count"
        if count_key in met and float(met[count_key]) == 0:
            continue
        out[AUX_METRICS.get(name, name)] = float(v)
    return out

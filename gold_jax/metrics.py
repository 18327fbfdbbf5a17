"""Metric names (the recipe's) and the writers: tqdm bar, metrics.jsonl, TensorBoard.

Only process 0 writes; other processes get a writer that does nothing.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

from absl import logging

# Every step record carries all of these (None where a value is unknown, e.g. MFU on CPU).
STEP_METRICS = (
    "gold/on_policy_ratio", "gold/beta", "gold/lmbda", "gold/temperature", "gold/is_on_policy",
    "actor/jsd_loss", "actor/grad_norm", "actor/lr", "actor/skipped_steps",
    "response_seq_len/mean", "response_seq_len/max", "response_seq_len/min",
    "perf/mfu/actor", "perf/tokens_per_s",
    "timing/gen", "timing/teacher", "timing/update", "timing/step", "timing/sync",
)

# bf16 dense peak FLOP/s per chip, for MFU. Unknown kinds (CPU) give no MFU.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
    "NVIDIA B200": 2250e12,
}


def peak_flops(device_kind: str) -> float | None:
    for prefix, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if device_kind.startswith(prefix):
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, device_kind: str, n_devices: int) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak (None when unknown)."""
    peak = peak_flops(device_kind)
    if peak is None or n_devices <= 0:
        return None
    return flops_per_token * tokens_per_s / (peak * n_devices)


def _clean(v: Any) -> Any:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return f if math.isfinite(f) else None


class MetricsWriter:
    """Writes one record per call to metrics.jsonl, TensorBoard and the progress bar."""

    def __init__(self, run_dir: str, *, total_steps: int, initial_step: int = 0, keep_through: int | None = None,
                 tensorboard: bool = True, progress_bar: bool = True, enabled: bool = True):
        """`keep_through`: the step a run restarts from (-1 for a fresh start): rows of later steps, left by
        a run killed after writing them, are dropped from the jsonl files and TensorBoard (purge step),
        so each step appears once. None keeps everything."""
        self.enabled = enabled
        self._tb = self._bar = self._jsonl = self._samples = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.run_dir = run_dir
        if keep_through is not None:
            for name in ("metrics.jsonl", "completions.jsonl"):
                dropped = drop_rows_after(os.path.join(run_dir, name), keep_through)
                if dropped:
                    logging.warning("%s: dropped %d rows past step %d (written by an interrupted run)",
                                    name, dropped, keep_through)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter   # optional at import time; installed with the package
            purge = None if keep_through is None else keep_through + 1
            # A restart gets its own events file even within the same second as the last one.
            suffix = f".from{purge}" if purge else ""
            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge, filename_suffix=suffix)
        if progress_bar:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=initial_step, desc="gold", dynamic_ncols=True)

    def write(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "kind": kind, **{k: _clean(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("step", "kind") and isinstance(v, float):
                    self._tb.add_scalar(k, v, step)
        if self._bar is not None and kind == "train":
            self._bar.update(1)
            short = {k.split("/")[-1]: v for k, v in rec.items()
                     if k in ("actor/jsd_loss", "actor/grad_norm", "gold/on_policy_ratio", "perf/tokens_per_s")}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in short.items() if v is not None})

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """(prompt, completion, teacher NLL) rows: console and completions.jsonl."""
        if not self.enabled:
            return
        if self._samples is None:
            self._samples = open(os.path.join(self.run_dir, "completions.jsonl"), "a", buffering=1)
        for r in rows:
            self._samples.write(json.dumps({"step": int(step), **r}) + "\n")
            line = f"[step {step}] nll={r['teacher_nll']:.3f} | {r['prompt']!r} -> {r['completion']!r}"
            (self._bar.write if self._bar is not None else print)(line)

    def close(self) -> None:
        """Idempotent: the demo closes the writer before plotting, the trainer again at exit."""
        for f in (self._jsonl, self._samples, self._tb, self._bar):
            if f is not None:
                f.close()
        self._jsonl = self._samples = self._tb = self._bar = None
        self.enabled = False


def read_jsonl(path: str, kind: str | None = "train") -> list[dict[str, Any]]:
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [r for r in recs if kind is None or r.get("kind") == kind]


def drop_rows_after(path: str, last_step: int) -> int:
    """Rewrite a jsonl file keeping the rows with step <= last_step (atomically); returns the number dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
    if len(keep) == len(lines):
        return 0
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
    return len(lines) - len(keep)

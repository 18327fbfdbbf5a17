"""One PNG per demo run: distillation loss and held-out accuracy over steps.

A newcomer should see at a glance that the loss falls and the student's
exact-match accuracy rises. Matplotlib's Agg backend: no display needed.
"""
from __future__ import annotations

import math
import os
from typing import Any

from absl import logging

from gold_jax.metrics import read_jsonl

LOSS_KEY, ACC_KEY = "actor/jsd_loss", "eval/accuracy"


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = {}
    for r in records:  # a resumed run rewrites steps: the last record of a step wins
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in r:
            pts[int(r["step"])] = float(v)
    steps = sorted(pts)
    return steps, [pts[s] for s in steps]


def plot_run(run_dir: str, out_path: str | None = None) -> str:
    """Write run_dir/metrics.png (or out_path) from run_dir/metrics.jsonl; returns its path."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir!r}: nothing to plot")
    ls, lv = _series(read_jsonl(path, kind="train"), LOSS_KEY)
    as_, av = _series(read_jsonl(path, kind="eval"), ACC_KEY)
    if not ls and not as_:
        raise ValueError(f"{path} has no {LOSS_KEY!r} (kind=train) or {ACC_KEY!r} (kind=eval) values")

    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        ax1.plot(ls, lv, lw=1, color="tab:blue")
        if len(lv) >= 20:  # the per-step loss is noisy (on- and off-policy batches alternate)
            w = max(2, len(lv) // 20)
            ax1.plot(ls[w - 1:], [sum(lv[i - w + 1:i + 1]) / w for i in range(w - 1, len(lv))],
                     lw=2, color="tab:orange", label=f"mean of {w}")
            ax1.legend()
        ax1.set(title="distillation loss (JSD)", xlabel="step", ylabel=LOSS_KEY)
        ax2.plot(as_, av, marker="o", color="tab:green")
        ax2.set(title="student exact-match accuracy (held-out)", xlabel="step", ylabel=ACC_KEY,
                ylim=(0, 1.02))
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        out = out_path or os.path.join(run_dir, "metrics.png")
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out


class PlotHook:
    """Trainer evaluation hook: metrics.png at the end of a demo run (metrics.jsonl is line-buffered)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def evaluate(self, student: Any) -> dict[str, Any]:
        return {}

    def end_of_run(self) -> None:
        logging.info("plot: %s", plot_run(self.run_dir))

    def close(self) -> None:
        pass

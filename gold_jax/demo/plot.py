"""One PNG per demo run: distillation loss and held-out accuracy over steps.

A newcomer should see at a glance that the loss falls, which steps were
on-policy, and how far the student's exact-match accuracy climbs towards the
teacher's. Matplotlib's Agg backend: no display needed.
"""
from __future__ import annotations

import math
import os
from typing import Any

from absl import logging

from gold_jax.metrics import read_jsonl

LOSS_KEY, ACC_KEY = "actor/jsd_loss", "eval/accuracy"
ON_POLICY_KEY = "gold/is_on_policy"   # 1.0: the step trained on student samples, 0.0: on dataset rows
ON_COLOR, OFF_COLOR = "tab:red", "tab:blue"


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = {}
    for r in records:  # a resumed run rewrites steps: the last record of a step wins
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in r:
            pts[int(r["step"])] = float(v)
    steps = sorted(pts)
    return steps, [pts[s] for s in steps]


def figure(run_dir: str, *, teacher_accuracy: float | None = None):
    """The metrics figure of run_dir/metrics.jsonl (a matplotlib Figure; the caller closes it).

    Loss panel: one point per step, coloured by where its batch came from (the
    student's own samples, on-policy, or dataset completions, off-policy), and a
    moving mean. Accuracy panel: the student's held-out accuracy and, when
    given, the teacher's as a horizontal line: the gap distillation closes.
    """
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir!r}: nothing to plot")
    train = read_jsonl(path, kind="train")
    ls, lv = _series(train, LOSS_KEY)
    as_, av = _series(read_jsonl(path, kind="eval"), ACC_KEY)
    if not ls and not as_:
        raise ValueError(f"{path} has no {LOSS_KEY!r} (kind=train) or {ACC_KEY!r} (kind=eval) values")
    on = dict(zip(*_series(train, ON_POLICY_KEY)))

    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ls, lv, lw=0.5, color="0.7", zorder=1)
    if on:   # runs written before gold/is_on_policy existed get the plain line only
        for flag, color, label in ((1.0, ON_COLOR, "on-policy step (student samples)"),
                                   (0.0, OFF_COLOR, "off-policy step")):
            pts = [(s, v) for s, v in zip(ls, lv) if on.get(s) == flag]
            if pts:
                ax1.scatter([s for s, _ in pts], [v for _, v in pts], s=6, color=color, label=label,
                            zorder=2)
    if len(lv) >= 20:  # the per-step loss is noisy (on- and off-policy batches alternate)
        w = max(2, len(lv) // 20)
        ax1.plot(ls[w - 1:], [sum(lv[i - w + 1:i + 1]) / w for i in range(w - 1, len(lv))],
                 lw=2, color="tab:orange", label=f"mean of {w}", zorder=3)
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend(fontsize=8)
    ax1.set(title="distillation loss (JSD)", xlabel="step", ylabel=LOSS_KEY)
    ax2.plot(as_, av, marker="o", color="tab:green", label="student")
    if teacher_accuracy is not None:
        ax2.axhline(teacher_accuracy, color="tab:purple", ls="--", lw=1.5,
                    label=f"teacher ({teacher_accuracy:.3f})")
    ax2.legend(fontsize=8, loc="lower right")
    ax2.set(title="student exact-match accuracy (held-out)", xlabel="step", ylabel=ACC_KEY,
            ylim=(0, 1.02))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_run(run_dir: str, out_path: str | None = None, *, teacher_accuracy: float | None = None) -> str:
    """Write run_dir/metrics.png (or out_path) from run_dir/metrics.jsonl; returns its path."""
    import matplotlib.pyplot as plt
    fig = figure(run_dir, teacher_accuracy=teacher_accuracy)
    try:
        out = out_path or os.path.join(run_dir, "metrics.png")
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out


class PlotHook:
    """Trainer evaluation hook: metrics.png at the end of a demo run (metrics.jsonl is line-buffered)."""

    def __init__(self, run_dir: str, teacher_accuracy: float | None = None):
        self.run_dir, self.teacher_accuracy = run_dir, teacher_accuracy

    def evaluate(self, student: Any) -> dict[str, Any]:
        return {}

    def end_of_run(self) -> None:
        logging.info("plot: %s", plot_run(self.run_dir, teacher_accuracy=self.teacher_accuracy))

    def close(self) -> None:
        pass

"""gold_jax's dense generalized JSD vs TRL's generalized_jsd_loss: forward + backward tokens/s.

Runs in its own virtualenv (torch and trl are not project dependencies):

    python3 -m venv .venv-trl
    .venv-trl/bin/pip install torch==2.13.0   # first: an unpinned torch pulls CUDA
    .venv-trl/bin/pip install trl && .venv-trl/bin/pip install -e .
    .venv-trl/bin/python benchmarks/loss_trl_bench.py

Both sides get the same float32 logits [1, N, V], V = 32000, and the same
completion mask (TRL: labels = -100 where masked), beta = 0.5, T = 0.9,
batchmean; the gradient is taken w.r.t. the student logits only. Times are
medians of `--reps` runs after a warm-up, the two sides alternating in one
process so that they see the same machine load. A benchmark, never a test.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

BETA, TEMP, VOCAB = 0.5, 0.9, 32000


def trl_loss_fn():
    """TRL's generalized_jsd_loss as installed (GKDTrainer is under trl.experimental in trl >= 1.x)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
    except ImportError:
        from trl import GKDTrainer  # trl < 1.0
    return GKDTrainer.generalized_jsd_loss


def trl_step(s: np.ndarray, t: np.ndarray, mask: np.ndarray):
    """A closure running TRL's loss forward + backward; returns the loss."""
    import torch
    loss_fn = trl_loss_fn()
    ts, tt = torch.from_numpy(s), torch.from_numpy(t)
    labels = torch.from_numpy(np.where(mask > 0, 1, -100))

    def step() -> float:
        x = ts.detach().requires_grad_(True)
        loss = loss_fn(x, tt, labels=labels, beta=BETA, temperature=TEMP, reduction="batchmean")
        loss.backward()
        return loss.detach().item()
    return step


def jax_step(s: np.ndarray, t: np.ndarray, mask: np.ndarray):
    """A closure running gold_jax's generalized_jsd forward + backward (jit); returns the loss."""
    import jax
    from gold_jax.losses import generalized_jsd
    f = jax.jit(jax.value_and_grad(lambda x, y, m: generalized_jsd(x, y, m, beta=BETA, temperature=TEMP)))
    xs = [jax.device_put(a) for a in (s, t, mask)]

    def step() -> float:
        loss, grad = f(*xs)
        grad.block_until_ready()
        return float(loss)
    return step


def timed(step) -> tuple[float, float]:
    t0 = time.perf_counter()
    loss = step()
    return time.perf_counter() - t0, loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    import torch
    print(f"load average {os.getloadavg()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"V={VOCAB}, beta={BETA}, T={TEMP}, float32, forward+backward")
    print(f"{'tokens':>7} {'TRL tok/s':>11} {'gold_jax tok/s':>15} {'ratio':>7} {'|loss diff|':>12}")
    for n in args.tokens:
        r = np.random.default_rng(n)
        s = (r.normal(size=(1, n, VOCAB)) * 2).astype(np.float32)
        t = (r.normal(size=(1, n, VOCAB)) * 2).astype(np.float32)
        mask = (r.random((1, n)) < 0.9).astype(np.float32)
        steps = {"trl": trl_step(s, t, mask), "jax": jax_step(s, t, mask)}
        losses = {k: step() for k, step in steps.items()}  # warm-up, and the JAX compile
        times = {k: [] for k in steps}
        for _ in range(args.reps):  # alternate, so that a burst of machine load hits both alike
            for k, step in steps.items():
                times[k].append(timed(step)[0])
        t_trl, t_jax = statistics.median(times["trl"]), statistics.median(times["jax"])
        print(f"{n:>7} {n / t_trl:>11.0f} {n / t_jax:>15.0f} {t_trl / t_jax:>6.1f}x "
              f"{abs(losses['trl'] - losses['jax']):>12.2e}", flush=True)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()

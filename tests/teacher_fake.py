"""A fake teacher backend for tests only: a random bigram table, with fault knobs.

Run as a script it is a worker process: python tests/teacher_fake.py --connect ADDR
[--delay S] [--mark PATH] (PATH is created when a score call starts, so a
test can kill the worker mid-request).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gold_jax.teacher.backends.base import TeacherBackend, scores_from_logits_np  # noqa: E402
from gold_jax.types import FINISH_LENGTH, RolloutResult  # noqa: E402

FAKE_FINGERPRINT = "fake-fingerprint-0123456789abcdef"


class FakeBackend(TeacherBackend):
    def __init__(self, vocab_size: int = 50, embedding_size: int | None = None, *, seed: int = 0,
                 delay_s: float = 0.0, mark: str | None = None, max_length: int = 256):
        self.vocab_size, self.embedding_size = vocab_size, embedding_size or vocab_size
        self.table = np.random.default_rng(seed).normal(0, 2, (self.embedding_size, self.embedding_size))
        self.delay_s, self.mark, self.max_length = delay_s, mark, max_length
        self.calls: list[tuple[int, ...]] = []   # batch shapes seen (to check batching)

    def info(self):
        return {"model_name": "fake", "vocab_size": self.vocab_size, "embedding_size": self.embedding_size,
                "tokenizer_fingerprint": FAKE_FINGERPRINT, "max_length": self.max_length, "max_top_k": 16}

    def logits(self, input_ids):
        return self.table[np.asarray(input_ids)]

    def score(self, input_ids, attention_mask, *, top_k, temperature, completion_start):
        self.calls.append(tuple(np.shape(input_ids)))
        if self.mark:
            open(self.mark, "w").close()
        if self.delay_s:
            time.sleep(self.delay_s)
        return scores_from_logits_np(self.logits(input_ids), input_ids, top_k=top_k, temperature=temperature,
                                     completion_start=completion_start, vocab_size=self.vocab_size)

    def generate(self, prompt_ids, prompt_mask, *, max_new_tokens, temperature, top_p, top_k, seed):
        b = prompt_ids.shape[0]
        comp = (prompt_ids[:, -1:] + 1 + seed + np.arange(max_new_tokens)[None]) % self.vocab_size
        return RolloutResult(prompt_ids, prompt_mask, comp.astype(np.int32), np.ones_like(comp, np.int32),
                             logprobs=np.zeros(comp.shape, np.float32),
                             finish_reason=np.full((b,), FINISH_LENGTH, np.int32))


if __name__ == "__main__":
    from gold_jax.teacher.worker import serve_worker
    ap = argparse.ArgumentParser()
    ap.add_argument("--connect", required=True)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--mark", default=None)
    ap.add_argument("--heartbeat", type=float, default=0.1)
    a = ap.parse_args()
    serve_worker(FakeBackend(delay_s=a.delay, mark=a.mark), a.connect, heartbeat_s=a.heartbeat)

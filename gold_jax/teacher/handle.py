"""The trainer's one handle on its teacher: client, optional score cache, optional embedded server.

The host loop never branches on where teacher outputs come from (tunix's
rule): it calls `score(seq, cacheable=...)` and `generate(...)` and, at the
end, `close()`. Whether the scores come from a remote server, an embedded one
started for this run, or the on-disk cache of dataset rows is decided once,
in `gold_jax.components.connect_teacher`.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from absl import logging

from gold_jax.types import SequenceBatch


class TeacherHandle:
    """Scores at the run's fixed top-k and temperature; owns (and closes) what it wraps."""

    def __init__(self, client: Any, *, top_k: int, temperature: float, cache: Any = None, server: Any = None,
                 signal: str = "logprobs", step_teacher: Any = None, cross: Any = None):
        """`client`: a TeacherClient; `cache`: a CachedScorer over it or None; `server`: an embedded
        LocalTeacher or None."""
        self.client, self.cache, self.server = client, cache, server
        self.top_k, self.temperature = int(top_k), float(temperature)
        # H7: signal "hidden" asks for hidden states; step_teacher holds the teacher's head for the step.
        self.signal, self.step_teacher = signal, step_teacher
        # Issue 15: a teacher of another tokenizer (gold_jax.crosstok.request.CrossSpec): scores come back
        # aligned to the student's tokens; `cross.vocab_map` feeds the hybrid loss.
        self.cross = cross
        if cross is not None:
            self.signal = "cross"

    def score(self, seq: SequenceBatch, *, cacheable: bool = False) -> Future:
        """Future of TeacherScores. `cacheable`: rows whose tokens recur (dataset completions, not samples)."""
        if cacheable and self.cache is not None:
            return self.cache.score(seq, top_k=self.top_k, temperature=self.temperature, cache=True, **self._sig())
        return self.client.score(seq, top_k=self.top_k, temperature=self.temperature, **self._sig())

    def _sig(self) -> dict[str, Any]:
        if self.cross is not None:
            return {"signal": "cross", "cross": self.cross}
        return {} if self.signal == "logprobs" else {"signal": self.signal}

    def generate(self, *args: Any, **kw: Any) -> Future:
        """Teacher-sampled completions (gold.seq_kd); see TeacherClient.generate."""
        return self.client.generate(*args, **kw)

    def info(self) -> dict[str, Any]:
        return self.client.info()

    def close(self) -> None:
        """Client first (its I/O thread talks to the server), then the embedded server."""
        for obj in (self.client, self.server):
            if obj is not None:
                try:
                    obj.close()
                except Exception as e:  # noqa: BLE001 - closing must not mask the real error
                    logging.warning("closing %s failed: %s", type(obj).__name__, e)
        self.client = self.server = None

    def __enter__(self) -> TeacherHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

"""On-disk cache of teacher scores for dataset completions (config teacher.cache_dir).

Off-policy rows come back every epoch with the same tokens, so their teacher
top-k is stored per row on first use and read back later instead of asking
the server again. A row's key hashes its prompt and completion tokens with
top-k and temperature; the directory is split by the teacher's identity
(model name, tokenizer fingerprint, sizes from `info`), so a different
teacher never reads another's scores. Files are .npz written atomically and
read with allow_pickle=False.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Future
from typing import Any

import numpy as np

from gold_jax.types import SequenceBatch, TeacherScores

_IDENTITY_KEYS = ("model_name", "tokenizer_fingerprint", "vocab_size", "embedding_size", "max_length")


class CachedScorer:
    """Wraps a TeacherClient: `score(..., cache=True)` reads/writes the per-row cache."""

    caches = True

    def __init__(self, client: Any, directory: str):
        self.client = client
        info = client.info()
        ident = {k: info[k] for k in _IDENTITY_KEYS if k in info}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        self.directory = os.path.join(directory, digest)
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, "teacher.json"), "w") as f:
            json.dump(ident, f, indent=2)
        self.hits = self.misses = 0

    # -------------------------------------------------------------- keys and files
    @staticmethod
    def _key(prompt: np.ndarray, completion: np.ndarray, top_k: int, temperature: float,
             signal: str = "logprobs", mode: str = "") -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(prompt, np.int32).tobytes())
        h.update(b"|")
        h.update(np.ascontiguousarray(completion, np.int32).tobytes())
        h.update(f"|{int(top_k)}|{float(temperature)!r}".encode())
        if signal != "logprobs":   # H7: hidden states (keys of log-prob rows are unchanged)
            h.update(f"|{signal}".encode())
        if mode:   # issue 15: cross-tokenizer rows depend on the student tokenizer and the uld_* switches
            h.update(f"|{mode}".encode())
        return h.hexdigest()

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, key[:2], key + ".npz")

    def _row_keys(self, seq: SequenceBatch, top_k: int, temperature: float, signal: str = "logprobs",
                  mode: str = "") -> list[str]:
        return [self._key(seq.prompt_ids[i][seq.prompt_mask[i] == 1], seq.completion_ids[i][seq.completion_mask[i] == 1],
                          top_k, temperature, signal, mode) for i in range(seq.prompt_ids.shape[0])]

    def _load(self, key: str) -> dict[str, np.ndarray] | None:
        path = self._path(key)
        if not os.path.exists(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:  # a torn or foreign file: recompute rather than train on it
            os.remove(path)
            raise RuntimeError(f"corrupt teacher cache entry {path} removed ({e}); rerun to rescore") from e

    def _store(self, keys: list[str], seq: SequenceBatch, s: TeacherScores) -> None:
        for i, key in enumerate(keys):
            n = int(seq.completion_mask[i].sum())
            if getattr(s, "cross", None) is not None:   # issue 15: every field, with the row's counts
                row = {"logprobs": s.logprobs[i, :n]}
                row.update({f"cross.{k}": (v[i] if v.ndim == 1 else v[i, :n]) for k, v in s.cross.items()})
            elif getattr(s, "hidden", None) is not None:
                row = {"hidden_bits": np.ascontiguousarray(s.hidden[i, :n]).view(np.uint16)}
            else:
                row = {"logprobs": s.logprobs[i, :n], "token_logprob": s.token_logprob[i, :n]}
            if s.ids is not None:
                row.update(ids=s.ids[i, :n], topk_logmass=s.topk_logmass[i, :n])
            path = self._path(key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp.npz"
            np.savez(tmp, **row)
            os.replace(tmp, path)

    @staticmethod
    def _assemble(rows: list[dict[str, np.ndarray]], seq: SequenceBatch) -> TeacherScores:
        """Pad rows to the batch's completion length with finite filler (masked out of the loss)."""
        b, r = seq.completion_ids.shape
        if "cross.loss_mask" in rows[0]:
            return CachedScorer._assemble_cross(rows, b, r)
        if "hidden_bits" in rows[0]:   # H7: zero filler past each row's completion (masked out of the loss)
            import ml_dtypes
            hid = np.zeros((b, r, rows[0]["hidden_bits"].shape[-1]), np.uint16)
            for i, row in enumerate(rows):
                hid[i, :row["hidden_bits"].shape[0]] = row["hidden_bits"]
            return TeacherScores(None, None, None, None, hidden=hid.view(ml_dtypes.bfloat16))
        width = rows[0]["logprobs"].shape[-1]
        lp = np.full((b, r, width), -np.log(width), np.float32)   # uniform filler: finite values and grads
        tok = np.zeros((b, r), np.float32)
        topk = "ids" in rows[0]
        ids = np.broadcast_to(np.arange(width, dtype=np.int32), (b, r, width)).copy() if topk else None
        mass = np.zeros((b, r), np.float32) if topk else None
        for i, row in enumerate(rows):
            n = row["logprobs"].shape[0]
            lp[i, :n], tok[i, :n] = row["logprobs"], row["token_logprob"]
            if topk:
                ids[i, :n], mass[i, :n] = row["ids"], row["topk_logmass"]
        return TeacherScores(logprobs=lp, ids=ids, topk_logmass=mass, token_logprob=tok)

    @staticmethod
    def _assemble_cross(rows: list[dict[str, np.ndarray]], b: int, r: int) -> TeacherScores:
        """Cross rows padded with masked positions (loss_mask 0, no span, ids -1): gold_jax.crosstok.request."""
        k = rows[0]["logprobs"].shape[-1]
        lp, ids = np.zeros((b, r, k), np.float32), np.full((b, r, k), -1, np.int32)
        mass = np.zeros((b, r), np.float32)
        cross = {"logscale": np.zeros((b, r), np.float32), "span_id": np.full((b, r), -1, np.int32),
                 "span_base": np.zeros((b, r), np.int32),
                 "loss_mask": np.zeros((b, r), np.float32), "unaligned": np.zeros(b, np.int32),
                 "scored": np.zeros(b, np.int32)}
        for i, row in enumerate(rows):
            n = row["logprobs"].shape[0]
            lp[i, :n], ids[i, :n], mass[i, :n] = row["logprobs"], row["ids"], row["topk_logmass"]
            for name, v in cross.items():
                if v.ndim == 1:
                    v[i] = row[f"cross.{name}"]
                else:
                    v[i, :n] = row[f"cross.{name}"]
        return TeacherScores(logprobs=lp, ids=ids, topk_logmass=mass, token_logprob=None, cross=cross)

    # -------------------------------------------------------------- TeacherClient interface
    def score(self, seq: SequenceBatch, *, top_k: int, temperature: float, cache: bool = True,
              signal: str = "logprobs", cross: Any = None) -> Future:
        sig = {} if signal == "logprobs" else {"signal": signal}
        if cross is not None:
            sig["cross"] = cross
        if not cache:
            return self.client.score(seq, top_k=top_k, temperature=temperature, **sig)
        keys = self._row_keys(seq, top_k, temperature, signal, cross.key() if cross is not None else "")
        rows = [self._load(k) for k in keys]
        if all(r is not None for r in rows):
            self.hits += len(rows)
            fut: Future = Future()
            fut.set_result(self._assemble(rows, seq))
            return fut
        self.misses += len(rows)
        out: Future = Future()

        def done(f: Future) -> None:
            try:
                s = f.result()
                self._store(keys, seq, s)
            except BaseException as e:  # noqa: BLE001 - the trainer sees the error on its future
                out.set_exception(e)
                return
            out.set_result(s)

        self.client.score(seq, top_k=top_k, temperature=temperature, **sig).add_done_callback(done)
        return out

    def generate(self, *args: Any, **kw: Any) -> Future:
        return self.client.generate(*args, **kw)

    def info(self) -> dict[str, Any]:
        return self.client.info()

    def close(self) -> None:
        """The wrapped client is closed by its owner."""

"""grain pipeline: seeded per-epoch shuffle, global batches, this process's slice, bucketed padding.

Examples are tokenised eagerly once; grain's MapDataset then does index-level
shuffle/repeat/batch, so the iterator state is just a position and resumes exactly.
"""
from __future__ import annotations

import bisect
from typing import Any

import grain
from absl import flags
import ml_collections
import numpy as np

from gold_jax import jsonsafe
from gold_jax.data.config import make_buckets, validate
from gold_jax.data.special_tokens import eos_token_ids
from gold_jax.data.tokenize import DatasetStats, Example, tokenize_files


class Collate:
    """Global batch (list of examples) -> this process's padded slice.

    Bucket lengths come from the whole global batch so every process pads to the
    same shapes (jax.make_array_from_process_local_data needs that).
    """

    def __init__(self, process_index: int, local_batch: int, prompt_buckets: list[int],
                 response_buckets: list[int], pad_id: int):
        self.process_index, self.local_batch = process_index, local_batch
        self.prompt_buckets, self.response_buckets, self.pad_id = prompt_buckets, response_buckets, pad_id

    @staticmethod
    def _bucket(buckets: list[int], n: int) -> int:
        return buckets[min(bisect.bisect_left(buckets, n), len(buckets) - 1)]

    def __call__(self, examples: list[Example]) -> dict[str, np.ndarray]:
        P = self._bucket(self.prompt_buckets, max(len(p) for p, _ in examples))
        R = self._bucket(self.response_buckets, max(len(c) for _, c in examples))
        b, lo = self.local_batch, self.process_index * self.local_batch
        out = {"prompt_ids": np.full((b, P), self.pad_id, np.int32), "prompt_mask": np.zeros((b, P), np.int32),
               "completion_ids": np.full((b, R), self.pad_id, np.int32),
               "completion_mask": np.zeros((b, R), np.int32)}
        # Rows past the end of a final partial (eval) batch stay fully masked.
        for i, (p, c) in enumerate(examples[lo:lo + b]):
            out["prompt_ids"][i, P - len(p):] = p
            out["prompt_mask"][i, P - len(p):] = 1
            out["completion_ids"][i, :len(c)] = c
            out["completion_mask"][i, :len(c)] = 1
        return out


def _seed(cfg_seed: int, seed: int) -> int:
    return int(np.random.SeedSequence([int(cfg_seed), int(seed)]).generate_state(1)[0])


def build_dataset(data_cfg: ml_collections.ConfigDict, tokenizer: Any, *, split: str = "train",
                  global_batch_size: int, process_index: int = 0, process_count: int = 1, seed: int = 0,
                  num_epochs: int | None = None, require_response: bool = True
                  ) -> tuple[grain.MapDataset, DatasetStats]:
    """The batched MapDataset for one process and the tokenisation stats.

    require_response=False accepts prompt-only rows (runs with gold.lmbda=1 or gold.seq_kd).
    """
    validate(data_cfg)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not isinstance(global_batch_size, int) or global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be a positive int, got {global_batch_size!r}")
    if not isinstance(process_count, int) or process_count <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be divisible by process_count={process_count}")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index!r} must be in [0, {process_count})")
    if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs <= 0):
        raise ValueError(f"num_epochs must be None or a positive int, got {num_epochs!r}")
    key = f"data.{split}_files"
    examples, stats = tokenize_files(data_cfg[f"{split}_files"], tokenizer, data_cfg, key, require_response)

    collate = Collate(process_index, global_batch_size // process_count,
                      make_buckets(data_cfg.prompt_buckets, data_cfg.max_prompt_length, data_cfg.min_bucket,
                                   "data.prompt_buckets"),
                      make_buckets(data_cfg.response_buckets, data_cfg.max_response_length, data_cfg.min_bucket,
                                   "data.response_buckets"),
                      int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                          else eos_token_ids(tokenizer)[0]))
    train = split == "train"
    if train and len(examples) < global_batch_size:
        raise ValueError(f"{key}: {len(examples)} usable rows, fewer than global_batch_size={global_batch_size}")
    ds = grain.MapDataset.source(examples)
    if train and data_cfg.shuffle:
        # shuffle before repeat: grain derives a new permutation for every epoch from this seed.
        ds = ds.shuffle(seed=_seed(data_cfg.seed, seed))
    ds = ds.repeat(num_epochs) if num_epochs != 1 else ds
    # Every process batches the same global order and keeps its own rows of each batch.
    ds = ds.batch(global_batch_size, drop_remainder=train, batch_fn=list).map(collate)
    return ds, stats


def make_iterator(data_cfg: ml_collections.ConfigDict, tokenizer: Any, *, split: str = "train",
                  global_batch_size: int, process_index: int = 0, process_count: int = 1, seed: int = 0,
                  num_epochs: int | None = None, require_response: bool = True) -> grain.DatasetIterator:
    """Checkpointable iterator of padded numpy batches (this process's slice of each global batch)."""
    ds, _ = build_dataset(data_cfg, tokenizer, split=split, global_batch_size=global_batch_size,
                          process_index=process_index, process_count=process_count, seed=seed,
                          num_epochs=num_epochs, require_response=require_response)
    return iterate(ds, data_cfg)


def iterate(ds: grain.MapDataset, data_cfg: ml_collections.ConfigDict) -> grain.DatasetIterator:
    """Checkpointable iterator over a dataset from `build_dataset` (threads, optional worker processes)."""
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.num_threads, prefetch_buffer_size=8))
    if data_cfg.num_workers > 0:
        if not flags.FLAGS.is_parsed():
            # grain's worker processes read absl flags; outside an absl app (tests, notebooks)
            # nothing has parsed them, so take the defaults.
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
    return iter(it_ds)


def iterator_state_to_json(state: Any) -> str:
    """grain iterator state -> JSON text (bytes are tagged and base64-encoded: gold_jax.jsonsafe)."""
    return jsonsafe.dumps(state)


def iterator_state_from_json(text: str) -> Any:
    """Inverse of iterator_state_to_json."""
    return jsonsafe.loads(text)

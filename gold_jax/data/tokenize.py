"""Eager tokenisation of whole files into (prompt_ids, completion_ids) examples, with bad-row accounting."""
from __future__ import annotations

import collections
import dataclasses
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from gold_jax.data.config import parse_files, template_kwargs
from gold_jax.data.formats import NoCompletions, detect_format, render, split_row
from gold_jax.data.sources import BadRow, RowError, position_unit, read_rows
from gold_jax.data.special_tokens import eos_token_ids

Example = tuple[np.ndarray, np.ndarray]  # (prompt_ids int32 [p], completion_ids int32 [r])
MAX_LOGGED_BAD_ROWS = 20  # per file; all are counted
DETECT_ROWS = 100         # rows looked at to detect a file's format


@dataclasses.dataclass
class DatasetStats:
    """Rows read, kept, dropped by reason, truncated.

    Bad rows keep (file, position, reason, detail): the position is the 1-based
    line number in jsonl files and the 0-based row index in parquet files.
    """
    rows_read: int = 0
    rows_kept: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    truncated_prompts: int = 0
    truncated_responses: int = 0
    bad_rows: list[tuple[str, int, str, str]] = dataclasses.field(default_factory=list)

    @property
    def rows_dropped(self) -> int:
        return sum(self.dropped.values())

    def add_bad(self, path: str, index: int, err: RowError) -> None:
        self.dropped[err.reason] += 1
        self.bad_rows.append((path, index, err.reason, err.detail))

    def merge(self, other: DatasetStats) -> None:
        self.rows_read += other.rows_read
        self.rows_kept += other.rows_kept
        self.dropped.update(other.dropped)
        self.truncated_prompts += other.truncated_prompts
        self.truncated_responses += other.truncated_responses
        self.bad_rows.extend(other.bad_rows)

    def to_dict(self) -> dict[str, Any]:
        return {"rows_read": self.rows_read, "rows_kept": self.rows_kept, "rows_dropped": self.rows_dropped,
                "dropped": dict(self.dropped), "truncated_prompts": self.truncated_prompts,
                "truncated_responses": self.truncated_responses}

    def log(self, name: str) -> None:
        # Drops are a warning, so they show up even when info logs are filtered.
        (logging.warning if self.rows_dropped else logging.info)("data[%s]: %s", name, self.to_dict())


def _start_id(tokenizer: Any) -> int:
    """Prompt for plain-text rows: the model needs one position to predict the first token from."""
    if tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return int(eot) if isinstance(eot, int) and eot != tokenizer.unk_token_id else int(tokenizer.eos_token_id)


def _truncate(ids: list[int], limit: int, policy: str, what: str) -> tuple[list[int], bool]:
    if len(ids) <= limit:
        return ids, False
    if policy == "drop":
        raise BadRow(f"{what}_too_long", f"{what} has {len(ids)} tokens > max_{what}_length={limit}")
    return (ids[-limit:] if policy == "left" else ids[:limit]), True


def _detect(rows: list, cfg: ml_collections.ConfigDict, path: str, require_response: bool) -> str:
    """Format of the first rows that reveal one, so one bad leading row stays a bad row."""
    readable = [r for r in rows[:DETECT_ROWS] if not isinstance(r, RowError)]
    no_completions = None
    for r in readable:
        try:
            return detect_format(r, cfg, path, require_response)
        except NoCompletions as e:   # raised only if no row of the first ones has a completion
            no_completions = no_completions or e
        except ValueError:
            continue
    if no_completions is not None:
        raise no_completions
    if not readable:
        return "text"  # nothing readable: every row is reported bad and the file is an error
    return detect_format(readable[0], cfg, path, require_response)  # raises, naming the file and its columns


def tokenize_file(path: str, tokenizer: Any, cfg: ml_collections.ConfigDict,
                  require_response: bool = True) -> tuple[list[Example], DatasetStats]:
    """Every usable row of one file; a file with no usable rows is a ValueError naming it.

    require_response=False (runs that never train on dataset completions: gold.lmbda=1
    or gold.seq_kd) accepts prompt-only rows; their completion is the EOS alone.
    """
    eos_set = eos_token_ids(tokenizer)
    eos = eos_set[0]   # the tokenizer's eos_token: what ends a plain completion
    rows, where = read_rows(path)
    unit = position_unit(path)
    stats = DatasetStats(rows_read=len(rows))
    fmt = cfg.format if cfg.format != "auto" else _detect(rows, cfg, path, require_response)
    kw = template_kwargs(cfg)

    texts: list[tuple[int, str | None, str, bool, bool]] = []
    for i, row in enumerate(rows):
        try:
            if isinstance(row, RowError):
                raise BadRow(row.reason, row.detail)
            prompt, completion = split_row(row, fmt, cfg, require_response)
            texts.append((where[i], *render(tokenizer, prompt, completion, cfg.chat_template, kw),
                          completion is None))
        except BadRow as e:
            stats.add_bad(path, where[i], e.error)
        except ValueError as e:  # a setting that cannot work for this file (e.g. no chat template)
            raise ValueError(f"data file {path!r} (format {fmt!r}), {unit} {where[i]}: {e}") from None

    # One batched (Rust, multi-threaded) call per column instead of one per row.
    enc = lambda xs: tokenizer(xs, add_special_tokens=False)["input_ids"] if xs else []  # noqa: E731
    p_ids = enc([t[1] for t in texts if t[1] is not None])
    c_ids = enc([t[2] for t in texts])
    start = [_start_id(tokenizer)]
    examples: list[Example] = []
    p_iter = iter(p_ids)
    for (i, p_text, _, append_eos, prompt_only), c in zip(texts, c_ids):
        p = next(p_iter) if p_text is not None else start
        ends = [j for j, t in enumerate(c) if t in eos_set]
        if prompt_only:
            c = [eos]   # a placeholder: this run never trains on dataset completions
        elif append_eos or not ends:
            c = c + [eos]
        else:  # the template may add text after the turn end ("\n"): stop at the last EOS
            c = c[:ends[-1] + 1]
        try:
            if not p:
                raise BadRow("empty_prompt", "prompt tokenizes to nothing")
            if len(c) <= 1 and not prompt_only:
                raise BadRow("empty_completion", "completion tokenizes to nothing but EOS")
            p, tp = _truncate(p, cfg.max_prompt_length, cfg.truncation, "prompt")
            c, tc = _truncate(c, cfg.max_response_length, cfg.response_truncation, "response")
        except BadRow as e:
            stats.add_bad(path, i, e.error)
            continue
        stats.truncated_prompts += tp
        stats.truncated_responses += tc
        examples.append((np.asarray(p, np.int32), np.asarray(c, np.int32)))
    stats.rows_kept = len(examples)

    for f, i, reason, detail in stats.bad_rows[:MAX_LOGGED_BAD_ROWS]:
        logging.warning("data: dropped %s %d of %s (%s): %s", unit, i, f, reason, detail)
    if len(stats.bad_rows) > MAX_LOGGED_BAD_ROWS:
        logging.warning("data: ... and %d more bad rows in %s", len(stats.bad_rows) - MAX_LOGGED_BAD_ROWS, path)
    if not examples:
        detail = "; ".join(f"{unit} {i}: {r} ({d})" for _, i, r, d in stats.bad_rows[:3])
        raise ValueError(f"data file {path!r} has no usable rows ({stats.rows_read} read, format {fmt!r}"
                         f"{', e.g. ' + detail if detail else ''})")
    stats.log(path)
    return examples, stats


def tokenize_files(files: Any, tokenizer: Any, cfg: ml_collections.ConfigDict,
                   key: str = "data.train_files", require_response: bool = True
                   ) -> tuple[list[Example], DatasetStats]:
    """Concatenated examples of all files (in file order) and the summed stats."""
    examples: list[Example] = []
    total = DatasetStats()
    for path in parse_files(files, key):
        ex, st = tokenize_file(path, tokenizer, cfg, require_response)
        examples.extend(ex)
        total.merge(st)
    total.log(key)
    return examples, total

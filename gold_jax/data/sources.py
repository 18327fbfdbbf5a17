"""Read rows from local parquet and jsonl files."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import pyarrow.parquet as pq

from gold_jax.data.config import parse_files


@dataclasses.dataclass(frozen=True)
class RowError:
    """A row that could not be read or used: why, and a short detail for the log."""
    reason: str
    detail: str


class BadRow(Exception):
    """Raised by format/tokenisation code for one unusable row."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.error = RowError(reason, detail)


PARQUET_EXT = (".parquet", ".pq")
JSONL_EXT = (".jsonl", ".json", ".ndjson")


def position_unit(path: str) -> str:
    """How bad rows of this file are located: 1-based "line" (jsonl) or 0-based "row" (parquet)."""
    return "line" if os.path.splitext(path)[1].lower() in JSONL_EXT else "row"


def read_file(path: str) -> list[dict[str, Any] | RowError]:
    """All rows of one file, in order; unparsable jsonl lines become RowError."""
    return read_rows(path)[0]


def read_rows(path: str) -> tuple[list[dict[str, Any] | RowError], list[int]]:
    """(rows, positions): rows as in read_file, positions as `position_unit` says.

    Blank jsonl lines are not rows, so a row's line number is kept rather than
    derived from its index. A file that cannot be opened or parsed at all is a
    ValueError naming it, so a corrupt shard is never mistaken for an empty one.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext in PARQUET_EXT:
        try:
            rows = pq.read_table(path).to_pylist()
        except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
            raise ValueError(f"data file {path!r} is not a readable parquet file: {e}") from None
        return rows, list(range(len(rows)))
    if ext not in JSONL_EXT:
        raise ValueError(f"unsupported data file {path!r}: expected one of {PARQUET_EXT + JSONL_EXT}")
    rows: list[dict[str, Any] | RowError] = []
    lines: list[int] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            # Decode per line: one bad byte sequence costs one row, not the whole file.
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                rows.append(RowError("invalid_utf8", str(e)))
                lines.append(lineno)
                continue
            if not line.strip():
                continue  # blank lines are not rows
            lines.append(lineno)
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append(RowError("invalid_json", str(e)))
                continue
            rows.append(row if isinstance(row, dict) else RowError("wrong_type", f"row is a {type(row).__name__}, not an object"))
    return rows, lines


def load_rows(files: Any) -> list[tuple[str, int, dict[str, Any] | RowError]]:
    """(file, row index, row) for every row of every file (list or comma-separated string)."""
    out = []
    for path in parse_files(files, key="files"):
        out.extend((path, i, row) for i, row in enumerate(read_file(path)))
    return out

"""JSON and JSON Lines files: reading (plain or gzip) with errors that name the file and the line, and atomic
writes with the user's umask (:func:`lit_prune.io.atomic_open`). The one place the project reads and writes them."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from lit_prune.io import atomic_open

__all__ = ["iter_jsonl", "read_jsonl", "write_json", "write_jsonl"]


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for every non-blank line of ``path`` (``.gz`` is decompressed).

    Raises:
        ValueError: ``"<path>: line N is not valid JSON (...)"`` or ``"... must be a JSON object"``.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as stream:
        for line_number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {line_number} is not valid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}: line {line_number} must be a JSON object; got {type(record).__name__}")
            yield line_number, record


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON Lines file, in order (errors as :func:`iter_jsonl`)."""
    return [record for _, record in iter_jsonl(path)]


def write_json(data: dict, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON, atomically (parent folders are created); values JSON cannot hold are
    written as their ``str``."""
    with atomic_open(path, "w") as handle:
        json.dump(data, handle, indent=1, default=str)
    return Path(path)


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write one JSON object a line (UTF-8 kept as is), atomically (parent folders are created)."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return Path(path)

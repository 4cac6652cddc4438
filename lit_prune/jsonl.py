"""Read JSON Lines files (plain or gzip) with errors that name the file and the line."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

__all__ = ["iter_jsonl"]


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

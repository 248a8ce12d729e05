"""Read raw records from JSONL, plain text (blank-line separated) or gzip of either.

Every physical input unit becomes a `RawRecord` carrying its source file and line, so that
whatever happens to it later (kept or rejected) can be traced back to file:line.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

FORMATS = ("text", "alpaca", "chatml")


@dataclass
class RawRecord:
    source: str
    line: int
    raw: str  # the verbatim input (decoded with replacement if the bytes were invalid)
    record: dict[str, Any] | None  # parsed record, None when unreadable
    error: str | None = None  # reject reason decided while reading ("invalid_utf8", "invalid_json")


def _open_bytes(path: Path):
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith((".jsonl", ".json", ".ndjson"))


def iter_records(path: str | Path) -> Iterator[RawRecord]:
    path = Path(path)
    if _is_jsonl(path):
        yield from _iter_jsonl(path)
    else:
        yield from _iter_text_blocks(path)


def _iter_jsonl(path: Path) -> Iterator[RawRecord]:
    with _open_bytes(path) as handle:
        for line_no, raw_bytes in enumerate(handle, start=1):
            if not raw_bytes.strip():
                continue
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRecord(str(path), line_no, raw_bytes.decode("utf-8", "replace").rstrip("\n"), None,
                                f"invalid_utf8: byte {exc.start}")
                continue
            raw = raw.rstrip("\r\n")
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                yield RawRecord(str(path), line_no, raw, None, f"invalid_json: {exc.msg} at column {exc.colno}")
                continue
            if not isinstance(record, dict):
                yield RawRecord(str(path), line_no, raw, None, f"invalid_json: expected an object, got {type(record).__name__}")
                continue
            yield RawRecord(str(path), line_no, raw, record)


def _iter_text_blocks(path: Path) -> Iterator[RawRecord]:
    """One document per blank-line-separated block; `line` is the block's first line."""
    block: list[str] = []
    start = 0
    bad: str | None = None
    with _open_bytes(path) as handle:
        for line_no, raw_bytes in enumerate(handle, start=1):
            try:
                line = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = raw_bytes.decode("utf-8", "replace")
                bad = bad or f"invalid_utf8: line {line_no} byte {exc.start}"
            if line.strip():
                if not block:
                    start = line_no
                block.append(line.rstrip("\r\n"))
                continue
            if block:
                yield _text_record(path, start, block, bad)
                block, bad = [], None
    if block:
        yield _text_record(path, start, block, bad)


def _text_record(path: Path, start: int, block: list[str], bad: str | None) -> RawRecord:
    raw = "\n".join(block)
    return RawRecord(str(path), start, raw, None if bad else {"text": raw}, bad)

"""Read raw records from JSONL, plain text (blank-line separated) or gzip of either.

Every physical input unit becomes a `RawRecord` carrying its source file and line, so that
whatever happens to it later (kept or rejected) can be traced back to file:line, and its exact
bytes, so that a rejected record can be restored as it was.
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from jp_peft.data.errors import InputFileError

FORMATS = ("text", "alpaca", "chatml")
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass
class RawRecord:
    source: str
    line: int
    # The record's bytes as in the input, without the final line terminator, decoded as UTF-8. When
    # those bytes are not valid UTF-8, `raw` shows them with U+FFFD and `raw_b64` holds them exactly.
    raw: str
    record: dict[str, Any] | None  # parsed record, None when unreadable
    error: str | None = None  # reject reason decided while reading ("invalid_utf8: ...", "invalid_json: ...")
    raw_b64: str = ""
    input_pos: int = 0  # bytes of this file read from disk once this record is read (compressed, for gzip)


def _without_terminator(line: bytes) -> bytes:
    """The line without its own "\\n" or "\\r\\n": only that is the separator, anything else is content."""
    if line.endswith(b"\r\n"):
        return line[:-2]
    return line[:-1] if line.endswith(b"\n") else line


def _lines(path: Path) -> Iterator[tuple[int, bytes, int]]:
    """(line number, the line's bytes with its terminator, bytes read from disk so far).

    A UTF-8 byte-order mark at the start of the file marks the encoding, it is not part of the
    first record. A gzip stream that is truncated or corrupt stops the run (InputFileError, naming
    the last line read) rather than passing for a shorter input.
    """
    line_no = 0
    with open(path, "rb") as disk:
        is_gzip = disk.read(2) == b"\x1f\x8b"
        disk.seek(0)
        handle = gzip.GzipFile(fileobj=disk, mode="rb") if is_gzip else disk
        try:
            for line_no, line in enumerate(handle, start=1):
                if line_no == 1 and line.startswith(UTF8_BOM):
                    line = line[len(UTF8_BOM):]
                yield line_no, line, disk.tell()
        except (EOFError, OSError, zlib.error) as exc:
            what = "truncated or corrupt gzip data" if is_gzip else "read error"
            where = f"after line {line_no}" if line_no else "before the first line"
            raise InputFileError(f"{path}: {what} {where}: {exc}") from None


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith((".jsonl", ".json", ".ndjson"))


def iter_records(path: str | Path) -> Iterator[RawRecord]:
    path = Path(path)
    if _is_jsonl(path):
        yield from _iter_jsonl(path)
    else:
        yield from _iter_text_blocks(path)


def _undecodable(path: Path, line_no: int, data: bytes, detail: str, pos: int) -> RawRecord:
    return RawRecord(str(path), line_no, data.decode("utf-8", "replace"), None, f"invalid_utf8: {detail}",
                     raw_b64=base64.b64encode(data).decode("ascii"), input_pos=pos)


def _iter_jsonl(path: Path) -> Iterator[RawRecord]:
    for line_no, line, pos in _lines(path):
        data = _without_terminator(line)
        if not data.strip():
            continue
        try:
            raw = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield _undecodable(path, line_no, data, f"byte {exc.start}", pos)
            continue
        record, error = _parse_json_object(raw)
        yield RawRecord(str(path), line_no, raw, record, error, input_pos=pos)


def _parse_json_object(raw: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        return None, f"invalid_json: {exc.msg} (column {exc.colno})"
    except RecursionError:
        return None, "invalid_json: nested too deeply"
    if not isinstance(record, dict):
        return None, f"invalid_json: expected an object, got {type(record).__name__}"
    # "\ud800" escapes are valid JSON but decode to lone surrogates, which no UTF-8 output can hold.
    if "\\u" in raw:
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            return None, f"invalid_utf8: a \\u escape decodes to an unpaired surrogate ({exc.object[exc.start]!a})"
    return record, None


def _iter_text_blocks(path: Path) -> Iterator[RawRecord]:
    """One document per blank-line-separated block; `line` is the block's first line."""
    block: list[bytes] = []
    start = pos = 0
    for line_no, line, pos in _lines(path):
        if line.decode("utf-8", "replace").strip():
            if not block:
                start = line_no
            block.append(line)
            continue
        if block:
            yield _text_record(path, start, block, pos)
            block = []
    if block:
        yield _text_record(path, start, block, pos)


def _text_record(path: Path, start: int, block: list[bytes], pos: int) -> RawRecord:
    data = _without_terminator(b"".join(block))
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = start + data.count(b"\n", 0, exc.start)
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1)
        return _undecodable(path, start, data, f"line {bad_line} byte {column}", pos)
    return RawRecord(str(path), start, raw, {"text": raw}, input_pos=pos)

"""Read raw records from JSONL, plain text (blank-line separated) or gzip of either.

Every physical input unit becomes a `RawRecord` carrying its source file and line, so that
whatever happens to it later (kept or rejected) can be traced back to file:line, and its exact
bytes, so that a rejected record can be restored as it was.

An uncompressed file can be read one byte range at a time (`iter_records(path, start, end,
first_line)`), so that several tasks share a big file: a record belongs to the range that holds
its first byte, whichever range its last byte lies in. A gzip file is always read whole.
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

FORMATS = ("text", "alpaca", "chatml", "preference")
UTF8_BOM = b"\xef\xbb\xbf"
_BACK_CHUNK = 1 << 16


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
    input_index: int = 0  # which of the run's inputs (the same path may be given twice)


def is_gzip(path: str | Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _without_terminator(line: bytes) -> bytes:
    """The line without its own "\\n" or "\\r\\n": only that is the separator, anything else is content."""
    if line.endswith(b"\r\n"):
        return line[:-2]
    return line[:-1] if line.endswith(b"\n") else line


def line_start_at_or_after(path: str | Path, start: int) -> int:
    """Offset of the first line that starts at or after byte `start` (the file's size if none does)."""
    if start <= 0:
        return 0
    with open(path, "rb") as disk:
        disk.seek(start - 1)
        disk.readline()  # the rest of a line that began before `start`
        return disk.tell()


def _is_blank(line: bytes) -> bool:
    return not line.decode("utf-8", "replace").strip()


def previous_line_is_blank(path: str | Path, line_start: int) -> bool:
    """Whether the line before the one starting at `line_start` is blank (True at the start of the file)."""
    if line_start <= 0:
        return True
    with open(path, "rb") as disk:
        end = line_start  # the previous line is data[begin:end], its "\n" at end - 1
        pos, tail = end - 1, b""
        while True:
            lo = max(0, pos - _BACK_CHUNK)
            disk.seek(lo)
            chunk = disk.read(pos - lo) + tail
            cut = chunk.rfind(b"\n")
            if cut >= 0 or lo == 0:
                line = chunk[cut + 1:]
                if lo == 0 and cut < 0 and line.startswith(UTF8_BOM):
                    line = line[len(UTF8_BOM):]
                return _is_blank(line)
            pos, tail = lo, chunk


def _lines(path: Path, start: int = 0, first_line: int = 1) -> Iterator[tuple[int, bytes, int, int]]:
    """(line number, the line's bytes with its terminator, bytes read from disk so far, offset of the
    line's first byte), from the first line that starts at or after `start`.

    A UTF-8 byte-order mark at the start of the file marks the encoding, it is not part of the
    first record. A gzip stream that is truncated or corrupt stops the run (InputFileError, naming
    the last line read) rather than passing for a shorter input.
    """
    line_no = first_line - 1
    with open(path, "rb") as disk:
        gzipped = disk.read(2) == b"\x1f\x8b"
        disk.seek(0)
        if gzipped and start:
            raise ValueError(f"{path}: a gzip file is read whole, not from byte {start}")
        handle = gzip.GzipFile(fileobj=disk, mode="rb") if gzipped else disk
        if start:
            disk.seek(start - 1)
            disk.readline()
        offset = disk.tell()
        try:
            for line_no, line in enumerate(handle, start=first_line):
                length = len(line)
                if offset == 0 and line.startswith(UTF8_BOM):
                    line = line[len(UTF8_BOM):]
                yield line_no, line, disk.tell(), offset
                offset += length
        except (EOFError, OSError, zlib.error) as exc:
            what = "truncated or corrupt gzip data" if gzipped else "read error"
            where = f"after line {line_no}" if line_no else "before the first line"
            raise InputFileError(f"{path}: {what} {where}: {exc}") from None


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith((".jsonl", ".json", ".ndjson"))


def iter_records(path: str | Path, start: int = 0, end: int | None = None, first_line: int = 1) -> Iterator[RawRecord]:
    """The records whose first byte lies in [start, end) (the whole file by default); `first_line` is
    the number of the first line that starts at or after `start`."""
    path = Path(path)
    if _is_jsonl(path):
        yield from _iter_jsonl(path, start, end, first_line)
    else:
        yield from _iter_text_blocks(path, start, end, first_line)


def _undecodable(path: Path, line_no: int, data: bytes, detail: str, pos: int) -> RawRecord:
    return RawRecord(str(path), line_no, data.decode("utf-8", "replace"), None, f"invalid_utf8: {detail}",
                     raw_b64=base64.b64encode(data).decode("ascii"), input_pos=pos)


def _iter_jsonl(path: Path, start: int, end: int | None, first_line: int) -> Iterator[RawRecord]:
    for line_no, line, pos, offset in _lines(path, start, first_line):
        if end is not None and offset >= end:
            break
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


def _iter_text_blocks(path: Path, start: int, end: int | None, first_line: int) -> Iterator[RawRecord]:
    """One document per blank-line-separated block; `line` is the block's first line. A block that
    started before `start` belongs to the range before; one that starts before `end` is read to its
    last line, past `end` if need be."""
    block: list[bytes] = []
    block_start = pos = 0
    # Lines that continue a block begun before `start` are skipped up to the next blank line.
    skipping = start > 0 and not previous_line_is_blank(path, line_start_at_or_after(path, start))
    for line_no, line, pos, offset in _lines(path, start, first_line):
        if end is not None and offset >= end and not block:
            break
        blank = _is_blank(line)
        if skipping:
            skipping = not blank
            continue
        if not blank:
            if not block:
                block_start = line_no
            block.append(line)
            continue
        if block:
            yield _text_record(path, block_start, block, pos)
            block = []
    if block:
        yield _text_record(path, block_start, block, pos)


def _text_record(path: Path, start: int, block: list[bytes], pos: int) -> RawRecord:
    data = _without_terminator(b"".join(block))
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = start + data.count(b"\n", 0, exc.start)
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1)
        return _undecodable(path, start, data, f"line {bad_line} byte {column}", pos)
    return RawRecord(str(path), start, raw, {"text": raw}, input_pos=pos)


def count_newlines(path: str | Path, start: int, end: int, chunk: int = 1 << 24) -> int:
    """Number of b"\\n" in bytes [start, end) of an uncompressed file."""
    count = 0
    with open(path, "rb") as disk:
        disk.seek(start)
        left = end - start
        while left > 0:
            data = disk.read(min(chunk, left))
            if not data:
                break
            count += data.count(b"\n")
            left -= len(data)
    return count

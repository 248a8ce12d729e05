"""The files `jp-peft data prepare` writes: which ones, that none of them is an input, and writing
them under temporary names renamed into place at the end, so that a failed run never leaves
files that look complete. The final datasets are the shards' datasets concatenated in shard (that
is, input) order, one shard at a time: memory does not grow with the corpus.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from array import array
from pathlib import Path
from typing import Any, Iterable

import numpy as np

TEXT_SPLITS = {"train": "_text_document", "validation": "_val_text_document"}
CHAT_SPLITS = {"train": "training.jsonl", "validation": "validation.jsonl"}  # under PREFIX/, NeMo's dataset_root
TOKEN_DTYPE = np.int32  # 4-byte tokens: Qwen2.5's vocabulary (151,665) does not fit 2 bytes


def splits(val_fraction: float) -> tuple[str, ...]:
    return ("train", "validation") if val_fraction > 0 else ("train",)


def planned_outputs(prefix: str, fmt: str, val_fraction: float) -> list[str]:
    """Every file a run writes or renames into place."""
    if fmt == "text":
        data = [prefix + TEXT_SPLITS[s] + ext for s in splits(val_fraction) for ext in (".bin", ".idx")]
    else:
        data = [str(Path(prefix) / CHAT_SPLITS[s]) for s in splits(val_fraction)]
    return data + [prefix + ".rejected.jsonl", prefix + ".report.json"]


def tmp_name(final: str) -> str:
    return f"{final}.tmp-{os.getpid()}"


def _same_file(a: str, b: str) -> bool:
    """Same path once symlinks and '..' are resolved, or the same inode (a hard link)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # `a` does not exist yet
        return False


def overwritten_input(inputs: tuple[str, ...], outputs: list[str]) -> tuple[str, str] | None:
    """(input, output) for the first output that is, or would replace, an input; None if none."""
    for output in outputs:
        for written in (output, tmp_name(output)):
            for path in inputs:
                if _same_file(written, path):
                    return path, written
    return None


def input_inside(inputs: tuple[str, ...], directory: str) -> str | None:
    """The first input that lies under `directory` (which a run removes), or None."""
    root = Path(directory).resolve()
    for path in inputs:
        if root in Path(path).resolve().parents:
            return path
    return None


# --- Megatron indexed datasets ----------------------------------------------------------------
# The .bin/.idx format of megatron/core/datasets/indexed_dataset.py (0.15): `.bin` the tokens of every
# document back to back; `.idx` _INDEX_HEADER, version 1 (<Q), DType code (<B), sequence count (<Q),
# document count + 1 (<Q), sequence lengths int32, sequence byte offsets int64, document indices int64
# (one sequence per document: 0..n). Written here with numpy, without importing megatron.core (with
# torch, 3-5 s in every process that would); tests/data/test_sharded_pipeline.py checks these
# constants against megatron.core and the files byte for byte against its IndexedDatasetBuilder, and
# NeMo reads them with megatron.core's IndexedDataset.
INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
INT32_CODE = 4  # megatron.core.datasets.indexed_dataset.DType.int32
_PREAMBLE = len(INDEX_HEADER) + 8 + 1 + 8 + 8


class IndexedDatasetWriter:
    """One indexed dataset (one sequence per document), holding 8 bytes per document until `finalize`."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.data = open(prefix + ".bin", "wb")
        self.lengths = array("q")

    def add_document(self, tokens: np.ndarray) -> None:
        self.data.write(np.asarray(tokens, dtype=TOKEN_DTYPE).tobytes())
        self.lengths.append(len(tokens))

    def finalize(self) -> None:
        self.data.close()
        lengths = np.frombuffer(self.lengths, dtype=np.int64)
        with open(self.prefix + ".idx", "wb") as out:
            _write_preamble(out, len(lengths))
            out.write(lengths.astype(np.int32).tobytes())
            out.write(_pointers(lengths, 0).tobytes())
            out.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())


def _write_preamble(out, sequences: int) -> None:
    out.write(INDEX_HEADER)
    out.write(struct.pack("<Q", INDEX_VERSION))
    out.write(struct.pack("<B", INT32_CODE))
    out.write(struct.pack("<Q", sequences))
    out.write(struct.pack("<Q", sequences + 1))


def _pointers(lengths: np.ndarray, offset: int) -> np.ndarray:
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    starts = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], out=starts[1:])
    return offset + starts * itemsize


def read_sequence_lengths(idx_path: str) -> np.ndarray:
    """The sequence lengths of an .idx this module wrote (memory-mapped)."""
    with open(idx_path, "rb") as handle:
        preamble = handle.read(_PREAMBLE)
    if preamble[:len(INDEX_HEADER)] != INDEX_HEADER or preamble[len(INDEX_HEADER) + 8] != INT32_CODE:
        raise ValueError(f"{idx_path}: not an int32 Megatron index")
    count = struct.unpack("<Q", preamble[len(INDEX_HEADER) + 9:len(INDEX_HEADER) + 17])[0]
    if count == 0:
        return np.zeros(0, dtype=np.int32)
    return np.memmap(idx_path, dtype=np.int32, mode="r", offset=_PREAMBLE, shape=(count,))


def merge_indexed_datasets(prefixes: Iterable[str], idx_path: str) -> int:
    """Write the .idx of the concatenation of the indexed datasets at `prefixes` (their .bin files are
    concatenated in the same order by the caller), one shard's index in memory at a time (megatron's
    IndexedDatasetBuilder.add_index keeps the whole merged index in Python lists); returns the count."""
    prefixes = list(prefixes)
    total = sum(len(read_sequence_lengths(p + ".idx")) for p in prefixes)
    with open(idx_path, "wb") as out:
        _write_preamble(out, total)
        for prefix in prefixes:
            out.write(np.asarray(read_sequence_lengths(prefix + ".idx"), dtype=np.int32).tobytes())
        offset = 0
        for prefix in prefixes:
            lengths = np.asarray(read_sequence_lengths(prefix + ".idx"), dtype=np.int64)
            out.write(_pointers(lengths, offset).tobytes())
            offset += int(lengths.sum()) * np.dtype(TOKEN_DTYPE).itemsize
        out.write(np.arange(total + 1, dtype=np.int64).tobytes())
    return total


class PreparedOutputs:
    """The final datasets (or examples) and the rejects file, under temporary names until `commit()`."""

    def __init__(self, prefix: str, fmt: str, val_fraction: float):
        self.prefix, self.fmt = prefix, fmt
        self.final: dict[str, str] = {}  # temporary name -> final name
        self.data: dict[str, Any] = {}  # split -> open .bin (text) or JSONL (instructions)
        self.shards: dict[str, list[str]] = {}  # text: split -> shard prefixes, in order
        self.rejected = None
        self.made_dir: Path | None = None  # PREFIX/ when this run created it: removed again on failure
        try:
            self._open(val_fraction)
        except BaseException:
            self.abort()
            raise

    def _open(self, val_fraction: float) -> None:
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        if self.fmt != "text" and not Path(self.prefix).is_dir():
            Path(self.prefix).mkdir(parents=True)
            self.made_dir = Path(self.prefix)
        for split in splits(val_fraction):
            final = (self.prefix + TEXT_SPLITS[split] + ".bin" if self.fmt == "text"
                     else str(Path(self.prefix) / CHAT_SPLITS[split]))
            self.data[split] = open(self._tmp(final), "wb")
            self.shards[split] = []
        self.rejected = open(self._tmp(self.prefix + ".rejected.jsonl"), "w", encoding="utf-8")

    def _tmp(self, final: str) -> str:
        tmp = tmp_name(final)
        self.final[tmp] = final
        return tmp

    def append_shard(self, shard_prefix: str) -> None:
        """A shard's datasets (text) or examples (instructions), after those of the shards before it."""
        for split, handle in self.data.items():
            if self.fmt == "text":
                source = shard_prefix + TEXT_SPLITS[split]
                self.shards[split].append(source)
                source += ".bin"
            else:
                source = f"{shard_prefix}.{CHAT_SPLITS[split]}"
            with open(source, "rb") as shard:
                shutil.copyfileobj(shard, handle, 1 << 22)

    def commit(self, report: dict[str, Any], with_datasets: bool = True) -> None:
        """Rename everything into place, the report last: its presence marks a complete, consistent
        set of outputs. Without datasets (nothing to train on) only the rejects and the report are."""
        written = {}
        if with_datasets:
            for split, handle in self.data.items():
                handle.close()
                if self.fmt == "text":
                    base = self.prefix + TEXT_SPLITS[split]
                    merge_indexed_datasets(self.shards[split], self._tmp(base + ".idx"))
                    written[split] = base
                else:
                    written[split] = self.final[handle.name]
        else:
            self._discard_datasets()
        self.rejected.close()
        report["outputs"] = written | {"rejected": self.prefix + ".rejected.jsonl",
                                       "report": self.prefix + ".report.json"}
        report_tmp = self._tmp(self.prefix + ".report.json")
        Path(report_tmp).write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        for tmp in sorted(self.final, key=lambda p: p == report_tmp):
            os.replace(tmp, self.final[tmp])

    def _discard_datasets(self) -> None:
        for handle in self.data.values():
            handle.close()
        for tmp, final in list(self.final.items()):
            if not final.endswith(".rejected.jsonl"):
                Path(tmp).unlink(missing_ok=True)
                del self.final[tmp]
        if self.made_dir is not None and self.made_dir.exists() and not any(self.made_dir.iterdir()):
            self.made_dir.rmdir()

    def abort(self) -> None:
        self._discard_datasets()
        if self.rejected is not None:
            self.rejected.close()
        for tmp in self.final:
            Path(tmp).unlink(missing_ok=True)

"""The files `jp-peft data prepare` writes: which ones, that none of them is an input, and writing
them under temporary names renamed into place at the end, so that a failed run never leaves
files that look complete.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

TEXT_SPLITS = {"train": "_text_document", "validation": "_val_text_document"}
CHAT_SPLITS = {"train": "training.jsonl", "validation": "validation.jsonl"}  # under PREFIX/, NeMo's dataset_root


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


class PreparedOutputs:
    """Train/validation writers and the rejects file, under temporary names until `commit()`."""

    def __init__(self, prefix: str, fmt: str, val_fraction: float):
        self.prefix, self.fmt = prefix, fmt
        self.final: dict[str, str] = {}  # temporary name -> final name
        self.counts: Counter = Counter()
        self.builders: dict[str, tuple[Any, str]] = {}  # text: split -> (IndexedDatasetBuilder, prefix)
        self.files: dict[str, Any] = {}  # instructions: split -> open JSONL
        self.rejected = None
        self.made_dir: Path | None = None  # PREFIX/ when this run created it: removed again on failure
        try:
            self._open(val_fraction)
        except BaseException:
            self.abort()
            raise

    def _open(self, val_fraction: float) -> None:
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        if self.fmt == "text":
            from jp_peft.data import indexed_dataset_module

            builder_cls = indexed_dataset_module().IndexedDatasetBuilder
            for split in splits(val_fraction):
                base = self.prefix + TEXT_SPLITS[split]
                self.builders[split] = (builder_cls(self._tmp(base + ".bin"), dtype=np.int32), base)
        else:
            if not Path(self.prefix).is_dir():
                Path(self.prefix).mkdir(parents=True)
                self.made_dir = Path(self.prefix)
            for split in splits(val_fraction):
                self.files[split] = open(self._tmp(str(Path(self.prefix) / CHAT_SPLITS[split])), "w", encoding="utf-8")
        self.rejected = open(self._tmp(self.prefix + ".rejected.jsonl"), "w", encoding="utf-8")

    def _tmp(self, final: str) -> str:
        tmp = tmp_name(final)
        self.final[tmp] = final
        return tmp

    def keep(self, split: str, tokens: np.ndarray | None, examples: list[dict[str, str]]) -> None:
        if self.fmt == "text":
            builder, _ = self.builders[split]
            builder.add_document(tokens, [len(tokens)])
        else:
            handle = self.files[split]
            for example in examples:
                handle.write(json.dumps(example, ensure_ascii=False) + "\n")
            self.counts[f"examples_{split}"] += len(examples)
        self.counts[f"kept_{split}"] += 1

    def reject(self, source: str, line: int, reason: str, detail: str, raw: str, raw_b64: str = "") -> None:
        record = {"source": source, "line": line, "reason": reason, "detail": detail, "raw": raw}
        if raw_b64:  # the exact bytes, when they were not valid UTF-8 (raw then shows U+FFFD)
            record["raw_b64"] = raw_b64
        self.rejected.write(json.dumps(record, ensure_ascii=False) + "\n")

    def commit(self, report: dict[str, Any], with_datasets: bool = True) -> None:
        """Rename everything into place, the report last: its presence marks a complete, consistent
        set of outputs. Without datasets (nothing to train on) only the rejects and the report are."""
        written = {}
        if with_datasets and self.fmt == "text":
            for split, (builder, base) in self.builders.items():
                builder.finalize(self._tmp(base + ".idx"))
                written[split] = base
        elif with_datasets:
            for split, handle in self.files.items():
                handle.close()
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
        for builder, _ in self.builders.values():
            builder.data_file.close()
        for handle in self.files.values():
            handle.close()
        for tmp, final in list(self.final.items()):
            if not final.endswith(".rejected.jsonl"):
                Path(tmp).unlink(missing_ok=True)
                del self.final[tmp]
        if self.made_dir is not None and not any(self.made_dir.iterdir()):
            self.made_dir.rmdir()

    def abort(self) -> None:
        self._discard_datasets()
        if self.rejected is not None:
            self.rejected.close()
        for tmp in self.final:
            Path(tmp).unlink(missing_ok=True)

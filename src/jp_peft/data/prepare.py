"""`jp-peft data prepare`: raw Japanese corpora -> Megatron indexed datasets or SFT JSONL.

Every record read is either kept or rejected with a reason; rejects go verbatim to
PREFIX.rejected.jsonl and the counts to PREFIX.report.json, where
read == kept + sum(rejected by reason). Outputs are written under temporary names and renamed
at the end, so a failed run never leaves files that look complete.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from jp_peft.data import chat
from jp_peft.data.dedup import MinHasher, NearDuplicateIndex, content_hash
# StrictModeError and NothingKeptError are what callers of prepare() catch; they import them from here.
from jp_peft.data.errors import NothingKeptError, StrictModeError
from jp_peft.data.normalize import japanese_ratio, normalize_text
from jp_peft.data.readers import FORMATS, RawRecord, iter_records

REJECT_REASONS = (
    "invalid_json", "invalid_utf8", "missing_field", "wrong_type", "control_token", "empty_after_cleaning",
    "too_short", "too_long", "not_japanese_enough", "exact_duplicate", "near_duplicate",
)


@dataclass(frozen=True)
class PrepareConfig:
    inputs: tuple[str, ...]
    output_prefix: str
    tokenizer: str
    format: str = "text"
    workers: int = 1
    strict: bool = False
    min_chars: int = 20
    max_chars: int = 200_000
    min_ja_ratio: float = 0.3
    dedup: bool = True
    near_dedup: bool = True
    near_dedup_threshold: float = 0.8
    num_perm: int = 128
    val_fraction: float = 0.0
    append_eos: bool = True
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(str(p) for p in self.inputs))
        if self.format not in FORMATS:
            raise ValueError(f"--format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if not self.inputs:
            raise ValueError("--input: at least one input file is required")
        for path in self.inputs:
            if not Path(path).is_file():
                raise ValueError(f"--input: {path} does not exist or is not a file")
        if self.workers < 1:
            raise ValueError(f"--workers: must be >= 1, got {self.workers}")
        if not 0 <= self.min_chars <= self.max_chars:
            raise ValueError(f"--min-chars/--max-chars: need 0 <= min <= max, got {self.min_chars}, {self.max_chars}")
        if not 0.0 <= self.min_ja_ratio <= 1.0:
            raise ValueError(f"--min-ja-ratio: must be in [0, 1], got {self.min_ja_ratio}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction: must be in [0, 1), got {self.val_fraction}")


@dataclass
class Processed:
    """What a worker returns for one raw record."""

    source: str
    line: int
    raw: str
    raw_b64: str = ""
    reason: str | None = None
    detail: str = ""
    text: str = ""  # cleaned text (documents) or the conversation's contents (instructions)
    chars: int = 0
    tokens: np.ndarray | None = None  # text format: token ids with EOS
    examples: list[dict[str, Any]] = field(default_factory=list)  # instruction formats
    n_tokens: int = 0
    hash: str = ""
    signature: np.ndarray | None = None


# --- worker side ------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _special_tokens(tok) -> list[str]:
    decoder = getattr(tok, "added_tokens_decoder", {}) or {}
    return list(tok.all_special_tokens) + [t.content for t in decoder.values() if getattr(t, "special", False)]


def _init_worker(cfg: PrepareConfig, parallel_tokenizer: bool = False) -> None:
    # One worker process per core: the tokenizer's own threads would only oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel_tokenizer else "false"
    from transformers import AutoTokenizer

    _WORKER["cfg"] = cfg
    tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    tok.model_max_length = 10**9  # documents are cut into sequences later, never here
    _WORKER["tok"] = tok
    _WORKER["control"] = chat.control_token_pattern(_special_tokens(tok))
    _WORKER["minhash"] = MinHasher(cfg.num_perm) if cfg.near_dedup else None


def _process_chunk(chunk: list[RawRecord]) -> list[Processed]:
    """Clean and filter each record, then tokenise the survivors in one batch call."""
    cfg: PrepareConfig = _WORKER["cfg"]
    tok = _WORKER["tok"]
    results = [_clean_and_filter(raw) for raw in chunk]
    alive = [item for item in results if item.reason is None]
    if cfg.format == "text" and alive:
        encoded = tok([item.text for item in alive], add_special_tokens=False)["input_ids"]
        for item, ids in zip(alive, encoded):
            item.n_tokens = len(ids)
            if cfg.append_eos:
                ids.append(tok.eos_token_id)
            item.tokens = np.asarray(ids, dtype=np.int32)
    else:
        for item in alive:
            texts = [e["input"] + e["output"] for e in item.examples]
            item.n_tokens = sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
    return results


def _cleaned_messages(record: dict[str, Any], fmt: str) -> tuple[list[dict[str, str]], list[str]]:
    """The record's messages with cleaned contents, and the input field each came from."""
    if fmt == "alpaca":
        messages, fields = chat.alpaca_to_messages(record), ["instruction/input", "output"]
    else:
        messages = chat.chatml_messages(record)
        fields = [f"messages[{i}].content" for i in range(len(messages))]
    return [{"role": m["role"], "content": normalize_text(m["content"])} for m in messages], fields


def _clean_and_filter(raw: RawRecord) -> Processed:
    cfg: PrepareConfig = _WORKER["cfg"]
    out = Processed(raw.source, raw.line, raw.raw, raw.raw_b64)
    if raw.error:
        out.reason, _, out.detail = raw.error.partition(": ")
        return out
    try:
        if cfg.format == "text":
            value = raw.record.get("text")
            out.text = normalize_text(chat.require_string(value, "text"))
            chat.refuse_control_tokens({"text": out.text}, _WORKER["control"])
        else:
            messages, fields = _cleaned_messages(raw.record, cfg.format)
            chat.refuse_control_tokens({f: m["content"] for f, m in zip(fields, messages)}, _WORKER["control"])
            if any(not m["content"] for m in messages if m["role"] != "system"):
                raise chat.RecordError("empty_after_cleaning", "a user or assistant message is empty")
            out.text = "\n".join(m["content"] for m in messages)
            out.examples = chat.to_examples(messages)
    except chat.RecordError as exc:
        out.reason, out.detail = exc.reason, str(exc).partition(": ")[2]
        return out

    out.chars = len(out.text)
    if not out.text:
        out.reason = "empty_after_cleaning"
    elif out.chars < cfg.min_chars:
        out.reason, out.detail = "too_short", f"{out.chars} < {cfg.min_chars} characters"
    elif out.chars > cfg.max_chars:
        out.reason, out.detail = "too_long", f"{out.chars} > {cfg.max_chars} characters"
    elif cfg.min_ja_ratio > 0 and (ratio := japanese_ratio(out.text)) < cfg.min_ja_ratio:
        out.reason, out.detail = "not_japanese_enough", f"Japanese ratio {ratio:.2f} < {cfg.min_ja_ratio}"
    if out.reason:
        out.examples = []
        return out
    out.hash = content_hash(out.text)
    if _WORKER["minhash"] is not None:
        out.signature = _WORKER["minhash"].signature(out.text)
    return out


# --- main process -----------------------------------------------------------------------

def _chunks(records: Iterable[RawRecord], size: int) -> Iterator[list[RawRecord]]:
    chunk = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _all_records(cfg: PrepareConfig) -> Iterator[RawRecord]:
    for path in cfg.inputs:
        yield from iter_records(path)


def _processed_stream(cfg: PrepareConfig) -> Iterator[Processed]:
    """Processed records in input order; `imap` keeps order whatever the worker count."""
    chunks = _chunks(_all_records(cfg), 64)
    if cfg.workers == 1:
        _init_worker(cfg, parallel_tokenizer=False)
        for chunk in chunks:
            yield from _process_chunk(chunk)
        return
    ctx = mp.get_context("fork")
    with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(cfg,)) as pool:
        for result in pool.imap(_process_chunk, chunks):
            yield from result


def is_validation(doc_hash: str, fraction: float) -> bool:
    """Deterministic split: the document's own hash decides, not its position."""
    return fraction > 0 and int(doc_hash[:8], 16) / 0x100000000 < fraction


class _Outputs:
    """Train/validation writers with temporary names, renamed into place by `commit()`."""

    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg
        self.prefix = cfg.output_prefix
        self.tmp_suffix = f".tmp-{os.getpid()}"
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self.final: dict[str, str] = {}
        self.tmp: list[str] = []
        self.made_dir: Path | None = None
        if cfg.format == "text":
            from jp_peft.data import indexed_dataset_module

            IndexedDatasetBuilder = indexed_dataset_module().IndexedDatasetBuilder

            self.builders = {}
            for split, stem in (("train", "_text_document"), ("validation", "_val_text_document")):
                if split == "validation" and cfg.val_fraction == 0:
                    continue
                base = self.prefix + stem
                bin_tmp = self._tmp(base + ".bin")
                self.builders[split] = (IndexedDatasetBuilder(bin_tmp, dtype=np.int32), base)
        else:
            # PREFIX/ is a dataset_root as NeMo's FineTuningDataModule reads it.
            root = Path(self.prefix)
            self.made_dir = None if root.is_dir() else root  # removed again if it ends up empty
            root.mkdir(parents=True, exist_ok=True)
            self.files = {}
            for split, name in (("train", "training.jsonl"), ("validation", "validation.jsonl")):
                if split == "validation" and cfg.val_fraction == 0:
                    continue
                path = self._tmp(str(root / name))
                self.files[split] = open(path, "w", encoding="utf-8")
        self.rejected = open(self._tmp(self.prefix + ".rejected.jsonl"), "w", encoding="utf-8")
        self.counts = Counter()

    def _tmp(self, final: str) -> str:
        tmp = final + self.tmp_suffix
        self.final[tmp] = final
        self.tmp.append(tmp)
        return tmp

    def keep(self, item: Processed) -> str:
        split = "validation" if is_validation(item.hash, self.cfg.val_fraction) else "train"
        if self.cfg.format == "text":
            builder, _ = self.builders[split]
            builder.add_document(item.tokens, [len(item.tokens)])
        else:
            handle = self.files[split]
            for example in item.examples:
                handle.write(json.dumps(example, ensure_ascii=False) + "\n")
            self.counts[f"examples_{split}"] += len(item.examples)
        self.counts[f"kept_{split}"] += 1
        return split

    def reject(self, item: Processed) -> None:
        record = {"source": item.source, "line": item.line, "reason": item.reason, "detail": item.detail,
                  "raw": item.raw}
        if item.raw_b64:  # the exact bytes, when they were not valid UTF-8 (raw then shows U+FFFD)
            record["raw_b64"] = item.raw_b64
        self.rejected.write(json.dumps(record, ensure_ascii=False) + "\n")

    def commit(self, report: dict[str, Any], with_datasets: bool = True) -> dict[str, str]:
        """Without datasets (nothing to train on) only the rejects and the report are renamed into place."""
        written = {}
        if not with_datasets:
            self._discard_datasets()
        elif self.cfg.format == "text":
            for split, (builder, base) in self.builders.items():
                idx_tmp = self._tmp(base + ".idx")
                builder.finalize(idx_tmp)
                written[split] = base
        else:
            for split, handle in self.files.items():
                handle.close()
                written[split] = self.final[handle.name]
        self.rejected.close()
        report["outputs"] = written | {"rejected": self.prefix + ".rejected.jsonl",
                                       "report": self.prefix + ".report.json"}
        report_tmp = self._tmp(self.prefix + ".report.json")
        Path(report_tmp).write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        # The report is renamed last: its presence marks a complete, consistent set of outputs.
        for tmp in sorted(self.tmp, key=lambda p: p.endswith(".report.json" + self.tmp_suffix)):
            os.replace(tmp, self.final[tmp])
        return written

    def _discard_datasets(self) -> None:
        if self.cfg.format == "text":
            for builder, _ in self.builders.values():
                builder.data_file.close()
        else:
            for handle in self.files.values():
                handle.close()
        for tmp in [t for t in self.tmp if self.final[t] != self.prefix + ".rejected.jsonl"]:
            Path(tmp).unlink(missing_ok=True)
            self.tmp.remove(tmp)
        if self.made_dir is not None and not any(self.made_dir.iterdir()):
            self.made_dir.rmdir()

    def abort(self) -> None:
        self._discard_datasets()
        self.rejected.close()
        for tmp in self.tmp:
            Path(tmp).unlink(missing_ok=True)


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the pipeline; returns the report (also written to PREFIX.report.json)."""
    from tqdm import tqdm

    started = time.perf_counter()
    bytes_read = sum(Path(p).stat().st_size for p in cfg.inputs)
    outputs = _Outputs(cfg)
    rejected = Counter()
    seen_hashes: set[str] = set()
    near = NearDuplicateIndex(cfg.num_perm, cfg.near_dedup_threshold) if cfg.near_dedup else None
    read = kept = chars = tokens = 0
    try:
        bar = tqdm(total=bytes_read, unit="B", unit_scale=True, desc=f"prepare {Path(cfg.output_prefix).name}",
                   disable=not cfg.progress, mininterval=1.0)
        for item in _processed_stream(cfg):
            read += 1
            bar.update(len(item.raw.encode("utf-8")) + 1)
            if item.reason is None and cfg.dedup:
                if item.hash in seen_hashes:
                    item.reason, item.detail = "exact_duplicate", f"hash {item.hash}"
                elif near is not None and (similarity := near.find(item.signature)) is not None:
                    item.reason, item.detail = "near_duplicate", f"estimated Jaccard {similarity:.2f}"
            if item.reason is not None:
                if cfg.strict:
                    raise StrictModeError(f"{item.source}:{item.line}: rejected ({item.reason}"
                                          + (f": {item.detail}" if item.detail else "") + ")")
                rejected[item.reason] += 1
                outputs.reject(item)
                continue
            seen_hashes.add(item.hash)
            if near is not None:
                near.add(item.signature)
            outputs.keep(item)
            kept += 1
            chars += item.chars
            tokens += item.n_tokens
        bar.close()
        seconds = time.perf_counter() - started
        report = {
            "format": cfg.format,
            "inputs": list(cfg.inputs),
            "tokenizer": cfg.tokenizer,
            "read": read,
            "kept": kept,
            "kept_train": outputs.counts["kept_train"],
            "kept_validation": outputs.counts["kept_validation"],
            "rejected": {reason: rejected.get(reason, 0) for reason in REJECT_REASONS},
            "rejected_total": sum(rejected.values()),
            "chars": chars,
            "tokens": tokens,
            "chars_per_token": round(chars / tokens, 4) if tokens else None,
            "bytes_read": bytes_read,
            "seconds": round(seconds, 3),
            "docs_per_second": round(read / seconds, 1) if seconds else None,
            "mb_per_second": round(bytes_read / 1e6 / seconds, 3) if seconds else None,
            "config": asdict(cfg),
        }
        if cfg.format != "text":
            report["examples_train"] = outputs.counts["examples_train"]
            report["examples_validation"] = outputs.counts["examples_validation"]
        assert report["read"] == report["kept"] + report["rejected_total"], "report does not reconcile"
        if report["kept_train"] == 0:
            report["error"] = _nothing_to_train_on(report, cfg)
            outputs.commit(report, with_datasets=False)  # the rejects are kept aside all the same
            raise NothingKeptError(report["error"])
        outputs.commit(report)
        return report
    except NothingKeptError:
        raise
    except BaseException:
        outputs.abort()
        raise


def _nothing_to_train_on(report: dict[str, Any], cfg: PrepareConfig) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in report["rejected"].items() if v) or "none"
    if report["read"] == 0:
        what = "no records in the input"
    elif report["kept"] == 0:
        what = f"all {report['read']} records were rejected ({reasons})"
    else:
        what = (f"all {report['kept']} kept records fell into the validation split (--val-fraction "
                f"{cfg.val_fraction}; rejected: {reasons})")
    return (f"{what}: no dataset written, nothing to train on; rejects in {cfg.output_prefix}.rejected.jsonl, "
            f"counts in {cfg.output_prefix}.report.json")

"""`jp-peft data prepare`: raw Japanese corpora -> Megatron indexed datasets or SFT JSONL.

Every record read is either kept or rejected with a reason; rejects go verbatim to
PREFIX.rejected.jsonl and the counts to PREFIX.report.json, where
read == kept + sum(rejected by reason). Arguments, the tokenizer and the output paths are checked
before any work starts; outputs are written under temporary names and renamed at the end
(`outputs.py`), so a failed run never leaves files that look complete, and never touches an input.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from jp_peft.data import chat
from jp_peft.data.dedup import MinHasher, NearDuplicateIndex, content_hash
# StrictModeError and NothingKeptError are what callers of prepare() catch; they import them from here.
from jp_peft.data.errors import ConfigError, NothingKeptError, StrictModeError, Terminated
from jp_peft.data.normalize import japanese_ratio, normalize_text
from jp_peft.data.outputs import PreparedOutputs, overwritten_input, planned_outputs
from jp_peft.data.pool import map_in_workers, usable_cores, useful_workers
from jp_peft.data.progress import Progress
from jp_peft.data.readers import FORMATS, RawRecord, iter_records

REJECT_REASONS = (
    "invalid_json", "invalid_utf8", "missing_field", "wrong_type", "control_token", "empty_after_cleaning",
    "too_short", "too_long", "not_japanese_enough", "exact_duplicate", "near_duplicate",
)
CHUNK_RECORDS = 64  # records per unit of work sent to a worker
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


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
    progress_interval: float | None = None  # seconds between progress lines; None: 1 on a terminal, 30 in a log

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(str(p) for p in self.inputs))
        checks = [
            (self.format in FORMATS, "--format", f"{self.format!r} is not one of {', '.join(FORMATS)}"),
            (bool(self.inputs), "--input", "at least one input file is required"),
            (self.workers >= 1, "--workers", f"must be >= 1, got {self.workers}"),
            (0 <= self.min_chars <= self.max_chars, "--min-chars/--max-chars",
             f"need 0 <= min <= max, got {self.min_chars}, {self.max_chars}"),
            (0.0 <= self.min_ja_ratio <= 1.0, "--min-ja-ratio", f"must be in [0, 1], got {self.min_ja_ratio}"),
            (0.0 < self.near_dedup_threshold <= 1.0, "--near-dedup-threshold",
             f"must be in (0, 1], got {self.near_dedup_threshold}"),
            (self.num_perm >= 1, "num_perm", f"must be >= 1, got {self.num_perm}"),
            (0.0 <= self.val_fraction < 1.0, "--val-fraction", f"must be in [0, 1), got {self.val_fraction}"),
            (self.progress_interval is None or self.progress_interval > 0, "--progress-interval",
             f"must be positive, got {self.progress_interval}"),
        ]
        for ok, flag, message in checks:
            if not ok:
                raise ConfigError(f"{flag}: {message}")
        for path in self.inputs:
            if not Path(path).is_file():
                raise ConfigError(f"--input: {path} does not exist or is not a file")
        if self.format != "text" and Path(self.output_prefix).exists() and not Path(self.output_prefix).is_dir():
            raise ConfigError(f"--output-prefix: {self.output_prefix} is a file; {self.format} writes the "
                              f"directory {self.output_prefix}/ (training.jsonl, validation.jsonl)")
        clash = overwritten_input(self.inputs, planned_outputs(self.output_prefix, self.format, self.val_fraction))
        if clash:
            raise ConfigError(f"--output-prefix {self.output_prefix}: would overwrite the input {clash[0]} "
                              f"(by writing {clash[1]}); choose another prefix")


@dataclass
class Processed:
    """What a worker returns for one raw record."""

    source: str
    line: int
    raw: str
    raw_b64: str = ""
    input_pos: int = 0
    reason: str | None = None
    detail: str = ""
    text: str = ""  # cleaned text (documents) or the conversation's contents (instructions)
    chars: int = 0
    tokens: np.ndarray | None = None  # text format: token ids with EOS
    examples: list[dict[str, Any]] = field(default_factory=list)  # instruction formats
    n_tokens: int = 0
    hash: str = ""
    signature: np.ndarray | None = None


# --- the tokenizer, checked once in the main process --------------------------------------

def load_tokenizer(cfg: PrepareConfig):
    """The tokenizer, or ConfigError naming --tokenizer: checked here, before any worker starts."""
    from transformers import AutoTokenizer

    local = Path(cfg.tokenizer).expanduser()
    looks_like_path = cfg.tokenizer.startswith((".", "~", os.sep)) or cfg.tokenizer.count("/") > 1
    if looks_like_path and not local.exists():
        raise ConfigError(f"--tokenizer: {cfg.tokenizer} does not exist (expected a tokenizer directory or a "
                          "Hugging Face hub id)")
    if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"--tokenizer: {cfg.tokenizer} has none of {', '.join(TOKENIZER_FILES)}")
    try:
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    except Exception as exc:  # transformers/huggingface_hub raise OSError, ValueError, HFValidationError...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--tokenizer: cannot load {cfg.tokenizer!r}: {reason}") from None
    if cfg.format == "text" and cfg.append_eos and tok.eos_token_id is None:
        raise ConfigError(f"--tokenizer: {cfg.tokenizer} has no EOS token to end each document with")
    tok.model_max_length = 10**9  # documents are cut into sequences later, never here
    return tok


def _special_tokens(tok) -> list[str]:
    decoder = getattr(tok, "added_tokens_decoder", {}) or {}
    return list(tok.all_special_tokens) + [t.content for t in decoder.values() if getattr(t, "special", False)]


# --- worker side ------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(cfg: PrepareConfig, tok) -> None:
    # One worker process per core: the tokenizer's own threads would only oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["cfg"] = cfg
    _WORKER["tok"] = tok
    _WORKER["control"] = chat.control_token_pattern(_special_tokens(tok))
    _WORKER["minhash"] = MinHasher(cfg.num_perm) if cfg.near_dedup else None


def _init_pool_worker(cfg: PrepareConfig) -> None:
    # The main process handles Ctrl-C and SIGTERM: it stops the pool and removes the temporary files.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(cfg, load_tokenizer(cfg))


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
    out = Processed(raw.source, raw.line, raw.raw, raw.raw_b64, raw.input_pos)
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
    """Every input's records, `input_pos` counting the bytes of all inputs read so far."""
    done = 0
    for path in cfg.inputs:
        for record in iter_records(path):
            record.input_pos += done
            yield record
        done += Path(path).stat().st_size


def _process_in_order(cfg: PrepareConfig, tok, chunks: Iterator[list[RawRecord]], workers: int) -> Iterator[Processed]:
    """Processed records in input order, in this process or in `workers` forked ones."""
    if workers == 1:
        _init_worker(cfg, tok)
        for chunk in chunks:
            yield from _process_chunk(chunk)
        return
    with contextlib.closing(map_in_workers(_process_chunk, chunks, workers, _init_pool_worker, (cfg,))) as results:
        for result in results:
            yield from result


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises Terminated in the main thread, so that the temporary outputs get removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated("stopped by SIGTERM; temporary outputs removed")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def is_validation(doc_hash: str, fraction: float) -> bool:
    """Deterministic split: the document's own hash decides, not its position."""
    return fraction > 0 and int(doc_hash[:8], 16) / 0x100000000 < fraction


def _note(message: str) -> None:
    print(f"prepare: {message}", file=sys.stderr, flush=True)


@dataclass
class _Tally:
    read: int = 0
    kept: int = 0
    chars: int = 0
    tokens: int = 0
    rejected: Counter = field(default_factory=Counter)


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the pipeline; returns the report (also written to PREFIX.report.json)."""
    tok = load_tokenizer(cfg)
    started = time.perf_counter()
    bytes_read = sum(Path(p).stat().st_size for p in cfg.inputs)
    progress = Progress(f"prepare {Path(cfg.output_prefix).name}", bytes_read, cfg.progress_interval,
                        enabled=cfg.progress)
    with _sigterm_raises():
        outputs = PreparedOutputs(cfg.output_prefix, cfg.format, cfg.val_fraction)
        try:
            tally, workers = _keep_or_reject_all(cfg, tok, outputs, progress)
            report = _report(cfg, tally, outputs, bytes_read, time.perf_counter() - started, workers)
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
        finally:
            progress.close()


def _keep_or_reject_all(cfg: PrepareConfig, tok, outputs: PreparedOutputs, progress: Progress) -> tuple[_Tally, int]:
    """Every record through the workers, then dedup in input order; returns the tally and the worker count."""
    tally = _Tally()
    seen_hashes: set[str] = set()
    near = NearDuplicateIndex(cfg.num_perm, cfg.near_dedup_threshold) if cfg.near_dedup else None
    chunks = _chunks(_all_records(cfg), CHUNK_RECORDS)
    cores = usable_cores()
    # Read one chunk per worker ahead: a short input needs fewer workers than were asked for.
    ahead = list(itertools.islice(chunks, min(cfg.workers, cores)))
    workers, why = useful_workers(cfg.workers, cores, len(ahead), len(ahead) < min(cfg.workers, cores))
    if why:
        _note(f"--workers {cfg.workers}: using {workers} ({why})")
    # closing(): on any exception the workers stop now, not when the generator is collected
    with contextlib.closing(_process_in_order(cfg, tok, itertools.chain(ahead, chunks), workers)) as stream:
        for item in stream:
            tally.read += 1
            if item.reason is None and cfg.dedup:
                if item.hash in seen_hashes:
                    item.reason, item.detail = "exact_duplicate", f"hash {item.hash}"
                elif near is not None and (similarity := near.find(item.signature)) is not None:
                    item.reason, item.detail = "near_duplicate", f"estimated Jaccard {similarity:.2f}"
            if item.reason is not None:
                if cfg.strict:
                    raise StrictModeError(f"{item.source}:{item.line}: rejected ({item.reason}"
                                          + (f": {item.detail}" if item.detail else "") + ")")
                tally.rejected[item.reason] += 1
                outputs.reject(item.source, item.line, item.reason, item.detail, item.raw, item.raw_b64)
            else:
                seen_hashes.add(item.hash)
                if near is not None:
                    near.add(item.signature)
                split = "validation" if is_validation(item.hash, cfg.val_fraction) else "train"
                outputs.keep(split, item.tokens, item.examples)
                tally.kept += 1
                tally.chars += item.chars
                tally.tokens += item.n_tokens
            progress.update(tally.read, tally.kept, tally.read - tally.kept, item.input_pos)
    return tally, workers


def _report(cfg: PrepareConfig, tally: _Tally, outputs: PreparedOutputs, bytes_read: int, seconds: float,
            workers: int) -> dict[str, Any]:
    report = {
        "format": cfg.format,
        "inputs": list(cfg.inputs),
        "tokenizer": cfg.tokenizer,
        "read": tally.read,
        "kept": tally.kept,
        "kept_train": outputs.counts["kept_train"],
        "kept_validation": outputs.counts["kept_validation"],
        "rejected": {reason: tally.rejected.get(reason, 0) for reason in REJECT_REASONS},
        "rejected_total": sum(tally.rejected.values()),
        "chars": tally.chars,
        "tokens": tally.tokens,
        "chars_per_token": round(tally.chars / tally.tokens, 4) if tally.tokens else None,
        "bytes_read": bytes_read,
        "seconds": round(seconds, 3),
        "docs_per_second": round(tally.read / seconds, 1) if seconds else None,
        "mb_per_second": round(bytes_read / 1e6 / seconds, 3) if seconds else None,
        "workers": workers,
        "config": asdict(cfg),
    }
    if cfg.format != "text":
        report["examples_train"] = outputs.counts["examples_train"]
        report["examples_validation"] = outputs.counts["examples_validation"]
    assert report["read"] == report["kept"] + report["rejected_total"], "report does not reconcile"
    undeclared = set(tally.rejected) - set(REJECT_REASONS)
    assert not undeclared, f"reject reasons missing from REJECT_REASONS: {undeclared}"
    return report


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

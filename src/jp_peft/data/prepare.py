"""`jp-peft data prepare`: raw Japanese corpora -> Megatron indexed datasets, SFT JSONL or preference pairs.

Every record read is either kept or rejected with a reason; rejects go verbatim to
PREFIX.rejected.jsonl and the counts to PREFIX.report.json, where
read == kept + sum(rejected by reason), for the whole run and for every shard. Arguments, the
tokenizer and the output paths are checked before any work starts; outputs are written under
temporary names and renamed at the end (`outputs.py`), so a failed run never leaves files that look
complete, and never touches an input.

The work runs as datatrove pipeline stages over shards of the input (`pipeline.py`), on datatrove's
local executor or as Slurm array jobs (`engine.py`); the intermediate files live in a work
directory (`workdir.py`) from which a rerun continues where an interrupted run stopped.

Just over 400 lines: the argument checks, the run around the engine and the report are one contract
(read == kept + rejected, checked before and reconciled after), and each piece that could stand alone
already does (outputs.py, pipeline.py, engine.py, workdir.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jp_peft.data import chat
from jp_peft.data.dedup import MinHasher, content_hash
from jp_peft.data.errors import ConfigError, StrictModeError, Terminated
from jp_peft.data.normalize import japanese_ratio, normalize_text
from jp_peft.data.outputs import input_inside, overwritten_input, planned_outputs
from jp_peft.data.pool import usable_cores, useful_workers
from jp_peft.data.readers import FORMATS, RawRecord, iter_records

REJECT_REASONS = (
    "invalid_json", "invalid_utf8", "missing_field", "wrong_type", "control_token", "empty_after_cleaning",
    "too_short", "too_long", "not_japanese_enough", "exact_duplicate", "near_duplicate",
    "identical_pair",  # preference: chosen and rejected are the same text (nothing to prefer)
)
CHUNK_RECORDS = 64  # records cleaned per call of _process_chunk
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
EXECUTORS = ("local", "slurm")
SHARD_BYTES = 256 * 2**20  # without --tasks: at least one shard per 256 MiB of input (and per worker)


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
    executor: str = "local"  # local: datatrove's local executor, `workers` processes; slurm: array jobs
    tasks: int | None = None  # shards; None: one per worker and per 256 MiB of input
    slurm_profile: str | None = None  # slurm/NAME.yaml or a path; None: the partition of the Slurm job we run in
    work_dir: str | None = None  # intermediate files and completion marks; None: see `work`
    keep_work_dir: bool = False

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
            (self.executor in EXECUTORS, "--executor", f"{self.executor!r} is not one of {', '.join(EXECUTORS)}"),
            (self.tasks is None or self.tasks >= 1, "--tasks", f"must be >= 1, got {self.tasks}"),
            (self.slurm_profile is None or self.executor == "slurm", "--slurm-profile",
             "only with --executor slurm"),
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
        if inside := input_inside(self.inputs, self.work):
            flag = "--work-dir" if self.work_dir else "--output-prefix"
            raise ConfigError(f"{flag}: the input {inside} lies in the work directory {self.work}, which the run "
                              "removes when it ends; choose another")

    @property
    def work(self) -> str:
        """--work-dir; by default PREFIX.work on Slurm (the nodes must share it, as they share the outputs),
        and for a local run a directory of this output prefix under $JP_PEFT_WORK_ROOT (default: prepare/
        in the jp-peft cache), so that a stopped run leaves nothing beside its outputs."""
        if self.work_dir:
            return self.work_dir
        if self.executor == "slurm":
            return self.output_prefix + ".work"
        from jp_peft.tiny import cache_root

        root = Path(os.environ.get("JP_PEFT_WORK_ROOT") or cache_root() / "prepare")
        key = hashlib.sha256(str(Path(self.output_prefix).resolve()).encode()).hexdigest()[:16]
        return str(root / f"{Path(self.output_prefix).name}-{key}")


@dataclass
class Processed:
    """What cleaning makes of one raw record."""

    source: str
    line: int
    raw: str
    raw_b64: str = ""
    input_pos: int = 0
    input_index: int = 0  # which of cfg.inputs (the same path may be given twice)
    reason: str | None = None
    detail: str = ""
    text: str = ""  # cleaned text (documents) or the conversation's contents (instructions)
    chars: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)  # instruction formats
    hash: str = ""
    signature: np.ndarray | None = None


# --- the tokenizer, checked once in the main process --------------------------------------

# Tokenizer classes whose fast version is the Rust tokenizer of tokenizer.json as it is (transformers
# changes nothing in it at load time), so that RustTokenizer gives the same ids.
RUST_AS_IS = ("PreTrainedTokenizerFast", "Qwen2Tokenizer", "Qwen2TokenizerFast")
NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class RustTokenizer:
    """A tokenizer directory read with the Rust `tokenizers` library alone: the ids, EOS and special
    tokens of transformers' fast tokenizer for the same files, without importing transformers (2-3 s
    in every process that would). Used for the classes in RUST_AS_IS when every added token of
    tokenizer_config.json is in tokenizer.json with its id; anything else goes through AutoTokenizer."""

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer

        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        if (directory / "special_tokens_map.json").is_file():
            config = {**json.loads((directory / "special_tokens_map.json").read_text(encoding="utf-8")), **config}
        self.backend_tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.backend_tokenizer.no_truncation()  # what transformers does for a call without truncation/padding
        self.backend_tokenizer.no_padding()
        self.name_or_path = str(directory)
        if config.get("tokenizer_class") not in RUST_AS_IS:
            raise ValueError(f"tokenizer_class {config.get('tokenizer_class')!r}")
        added = config.get("added_tokens_decoder", {})
        for token_id, token in added.items():
            if self.backend_tokenizer.token_to_id(token["content"]) != int(token_id):
                raise ValueError(f"added token {token['content']!r} is not in tokenizer.json as id {token_id}")

        def content(value):
            return value.get("content") if isinstance(value, dict) else value

        named = [content(config.get(key)) for key in NAMED_SPECIAL]
        extra = [content(v) for v in config.get("additional_special_tokens") or []]
        special_added = [token["content"] for token in added.values() if token.get("special")]
        self.all_special_tokens = list(dict.fromkeys(t for t in [*named, *extra, *special_added] if t))
        self.added_tokens_decoder: dict = {}
        eos = content(config.get("eos_token"))
        self.eos_token_id = self.backend_tokenizer.token_to_id(eos) if eos else None


def load_tokenizer(cfg: PrepareConfig):
    """The tokenizer, or ConfigError naming --tokenizer: checked here, before any worker starts."""
    local = Path(cfg.tokenizer).expanduser()
    looks_like_path = cfg.tokenizer.startswith((".", "~", os.sep)) or cfg.tokenizer.count("/") > 1
    if looks_like_path and not local.exists():
        raise ConfigError(f"--tokenizer: {cfg.tokenizer} does not exist (expected a tokenizer directory or a "
                          "Hugging Face hub id)")
    if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"--tokenizer: {cfg.tokenizer} has none of {', '.join(TOKENIZER_FILES)}")
    tok = None
    if local.is_dir() and (local / "tokenizer.json").is_file() and (local / "tokenizer_config.json").is_file():
        with contextlib.suppress(Exception):  # anything unusual: transformers decides
            tok = RustTokenizer(local)
    if tok is None:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
        except Exception as exc:  # transformers/huggingface_hub raise OSError, ValueError, HFValidationError...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"--tokenizer: cannot load {cfg.tokenizer!r}: {reason}") from None
        tok.model_max_length = 10**9  # documents are cut into sequences later, never here
    if cfg.format == "text" and cfg.append_eos and tok.eos_token_id is None:
        raise ConfigError(f"--tokenizer: {cfg.tokenizer} has no EOS token to end each document with")
    return tok


def special_tokens(tok) -> tuple[str, ...]:
    decoder = getattr(tok, "added_tokens_decoder", {}) or {}
    return tuple(tok.all_special_tokens) + tuple(t.content for t in decoder.values() if getattr(t, "special", False))


# --- worker side: cleaning, filters, signatures --------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(cfg: PrepareConfig, specials: tuple[str, ...]) -> None:
    # One task process per core: the tokenizer's own threads would only oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _WORKER.get("cfg") == cfg and _WORKER.get("specials") == specials:
        return
    _WORKER.update(cfg=cfg, specials=specials, control=chat.control_token_pattern(specials),
                   minhash=MinHasher(cfg.num_perm) if cfg.dedup and cfg.near_dedup else None, seconds=Counter())


def _process_chunk(chunk: list[RawRecord]) -> list[Processed]:
    """Clean and filter each record; MinHash signatures of those that pass (near-dedup on)."""
    seconds: Counter = _WORKER["seconds"]
    started = time.perf_counter()
    results = [_clean_and_filter(raw) for raw in chunk]
    cleaned = time.perf_counter()
    seconds["clean_and_filter"] += cleaned - started
    if _WORKER["minhash"] is not None:
        for item in results:
            if item.reason is None:
                item.signature = _WORKER["minhash"].signature(item.text)
        seconds["minhash"] += time.perf_counter() - cleaned
    return results


def _cleaned_messages(record: dict[str, Any], fmt: str) -> tuple[list[dict[str, str]], list[str]]:
    """The record's messages with cleaned contents, and the input field each came from."""
    if fmt == "alpaca":
        messages, fields = chat.alpaca_to_messages(record), ["instruction/input", "output"]
    else:
        messages = chat.chatml_messages(record)
        fields = [f"messages[{i}].content" for i in range(len(messages))]
    return [{"role": m["role"], "content": normalize_text(m["content"])} for m in messages], fields


def _cleaned_pair(record: dict[str, Any]) -> tuple[str, list[dict[str, str]]]:
    """A preference record's text (what the length, language and duplicate checks see) and its one pair."""
    messages, chosen, rejected = chat.preference_parts(record)
    messages = [{"role": m["role"], "content": normalize_text(m["content"])} for m in messages]
    chosen, rejected = normalize_text(chosen), normalize_text(rejected)
    texts = {f"prompt[{i}].content": m["content"] for i, m in enumerate(messages)}
    chat.refuse_control_tokens({**texts, "chosen": chosen, "rejected": rejected}, _WORKER["control"])
    if any(not m["content"] for m in messages if m["role"] != "system") or not chosen or not rejected:
        raise chat.RecordError("empty_after_cleaning", "a prompt message, chosen or rejected is empty")
    if chosen == rejected:
        raise chat.RecordError("identical_pair", "chosen and rejected are the same text")
    return "\n".join([*(m["content"] for m in messages), chosen, rejected]), \
        [chat.preference_example(messages, chosen, rejected)]


def _clean_and_filter(raw: RawRecord) -> Processed:
    cfg: PrepareConfig = _WORKER["cfg"]
    out = Processed(raw.source, raw.line, raw.raw, raw.raw_b64, raw.input_pos, raw.input_index)
    if raw.error:
        out.reason, _, out.detail = raw.error.partition(": ")
        return out
    try:
        if cfg.format == "text":
            value = raw.record.get("text")
            out.text = normalize_text(chat.require_string(value, "text"))
            chat.refuse_control_tokens({"text": out.text}, _WORKER["control"])
        elif cfg.format == "preference":
            out.text, out.examples = _cleaned_pair(raw.record)
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
    return out


def is_validation(doc_hash: str, fraction: float) -> bool:
    """Deterministic split: the document's own hash decides, not its position."""
    return fraction > 0 and int(doc_hash[:8], 16) / 0x100000000 < fraction


def strict_error(source: str, line: int, reason: str, detail: str) -> StrictModeError:
    return StrictModeError(f"{source}:{line}: rejected ({reason}" + (f": {detail}" if detail else "") + ")")


def note(message: str) -> None:
    print(f"prepare: {message}", file=sys.stderr, flush=True)


# --- main process -----------------------------------------------------------------------

@contextlib.contextmanager
def sigterm_raises():
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


def _all_records(cfg: PrepareConfig) -> Iterator[RawRecord]:
    for path in cfg.inputs:
        yield from iter_records(path)


def planned_workers(cfg: PrepareConfig) -> int:
    """Local processes worth starting: no more than the usable cores, nor than a short input's chunks of
    CHUNK_RECORDS records (read ahead here); says so when that is fewer than asked for."""
    cores = usable_cores()
    want = min(cfg.workers, cores)
    ahead = sum(1 for _ in itertools.islice(_all_records(cfg), want * CHUNK_RECORDS + 1))
    chunks = math.ceil(ahead / CHUNK_RECORDS)
    workers, why = useful_workers(cfg.workers, cores, chunks, ahead <= want * CHUNK_RECORDS)
    if why and cfg.executor == "local":
        note(f"--workers {cfg.workers}: using {workers} ({why})")
    return workers


def default_tasks(cfg: PrepareConfig, workers: int) -> int:
    total = sum(Path(p).stat().st_size for p in cfg.inputs)
    return cfg.tasks or max(workers, math.ceil(total / SHARD_BYTES))


def build_report(cfg: PrepareConfig, totals: dict[str, Any], shards: list[dict[str, Any]], extra: dict[str, Any]
                 ) -> dict[str, Any]:
    """The report: the run's totals, every shard's own reconciliation, and how the run went."""
    seconds = totals["seconds"]
    report = {
        "format": cfg.format,
        "inputs": list(cfg.inputs),
        "tokenizer": cfg.tokenizer,
        "read": totals["read"],
        "kept": totals["kept_train"] + totals["kept_validation"],
        "kept_train": totals["kept_train"],
        "kept_validation": totals["kept_validation"],
        "rejected": {reason: totals["rejected"].get(reason, 0) for reason in REJECT_REASONS},
        "rejected_total": sum(totals["rejected"].values()),
        "chars": totals["chars"],
        "tokens": totals["tokens"],
        "chars_per_token": round(totals["chars"] / totals["tokens"], 4) if totals["tokens"] else None,
        "bytes_read": totals["bytes_read"],
        "seconds": round(seconds, 3),
        "docs_per_second": round(totals["read"] / seconds, 1) if seconds else None,
        "mb_per_second": round(totals["bytes_read"] / 1e6 / seconds, 3) if seconds else None,
        **extra,
        "shards": shards,
        "config": asdict(cfg),
    }
    if cfg.format != "text":
        report["examples_train"] = totals["examples_train"]
        report["examples_validation"] = totals["examples_validation"]
    assert report["read"] == report["kept"] + report["rejected_total"], "report does not reconcile"
    for shard in shards:
        assert shard["read"] == shard["kept"] + shard["rejected"], f"shard {shard['shard']} does not reconcile"
    undeclared = set(totals["rejected"]) - set(REJECT_REASONS)
    assert not undeclared, f"reject reasons missing from REJECT_REASONS: {undeclared}"
    return report


def nothing_to_train_on(report: dict[str, Any], cfg: PrepareConfig) -> str:
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

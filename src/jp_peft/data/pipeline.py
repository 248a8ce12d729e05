"""The stages of `jp-peft data prepare`, built from datatrove pipeline steps over shards of the input.

    count     (one task per shard, only when a file is split)  newlines per byte range: line numbers
    clean     (one task per shard)  read, validate, normalise, filter; reject with reason; MinHash
              signatures of the survivors (datatrove's signature files, one per LSH band)
    buckets   (one task per band)   datatrove's MinhashDedupBuckets: candidate pairs across all shards
    clusters  (one task)            candidate pairs verified on the full signature, joined into
                                    clusters; the first record of a cluster in input order is kept
    tokenize  (one task per shard)  duplicates rejected with reason; the rest tokenised in batches
                                    into the shard's indexed datasets (or ChatML examples)
    merge     (one task)            the shards' outputs concatenated in order, rejects in input
                                    order, the report; renamed into place

A shard is a contiguous byte range of the inputs (a gzip file is never split), so shard order is
input order and the outputs do not depend on how many tasks there are or where they run. Every
task's memory is bounded by its shard (and the clusters task's by the number of duplicates), not
by the corpus.

Over 400 lines because the plan and the steps that read and write the work directory's record
formats (survivors, rejects, duplicates) belong together; the MinHash steps, which follow datatrove's
own formats instead, are data/minhash_steps.py.
"""

from __future__ import annotations

import heapq
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets

from jp_peft.data import chat, prepare as prep
from jp_peft.data.dedup import lsh_bands
from jp_peft.data.minhash_steps import (BUCKET_READ_BUFFER, DUPLICATE_DTYPE, CharMinhashSignature, VerifiedClusters,
                                        minhash_config)
from jp_peft.data.errors import NothingKeptError
from jp_peft.data.outputs import CHAT_SPLITS, TEXT_SPLITS, TOKEN_DTYPE, IndexedDatasetWriter, PreparedOutputs
from jp_peft.data.readers import count_newlines, is_gzip, iter_records, line_start_at_or_after
from jp_peft.data.workdir import WorkDir

PLAN_VERSION = 1
KEY_WIDTH = 20  # rejects in the work dir start with "IIIIII:LLLLLLLLLLLL:" (input, line): merged in input order
TOKENIZE_BATCH = 256  # documents per call of the Rust tokenizer


# --- the plan: shards of the input ------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    """The records of input `input` whose first byte lies in [start, end)."""

    input: int
    path: str
    start: int
    end: int
    split: bool  # the file is divided among several pieces: line numbers need the newlines before `start`


@dataclass(frozen=True)
class Plan:
    cfg: "prep.PrepareConfig"
    work: str
    shards: tuple[tuple[Piece, ...], ...]
    specials: tuple[str, ...]  # the tokenizer's special tokens: records containing them are rejected
    bands: int  # LSH bands x rows of the MinHash signature (0 x 0 without dedup)
    rows: int
    workers: int
    started: float
    total_bytes: int
    progress_every: float  # seconds between a task's progress records

    @property
    def tasks(self) -> int:
        return len(self.shards)


def make_plan(cfg, workers: int, tasks: int, specials: tuple[str, ...], started: float) -> Plan:
    sizes = [Path(p).stat().st_size for p in cfg.inputs]
    total = sum(sizes)
    bounds = [round(k * total / tasks) for k in range(tasks + 1)]
    shards: list[list[Piece]] = [[] for _ in range(tasks)]
    offset = 0
    for index, (path, size) in enumerate(zip(cfg.inputs, sizes)):
        if size == 0 or is_gzip(path):  # read whole, by the shard holding its first byte
            shard = min(tasks - 1, max(k for k in range(tasks) if bounds[k] <= offset))
            shards[shard].append(Piece(index, path, 0, size, False))
        else:
            ranges = [(max(bounds[k], offset) - offset, min(bounds[k + 1], offset + size) - offset, k)
                      for k in range(tasks)]
            ranges = [r for r in ranges if r[0] < r[1]]
            for start, end, k in ranges:
                shards[k].append(Piece(index, path, start, end, len(ranges) > 1))
        offset += size
    if not cfg.dedup:
        bands, rows = 0, 0
    elif cfg.near_dedup:
        bands, rows = lsh_bands(cfg.num_perm, cfg.near_dedup_threshold)
    else:
        bands, rows = 1, 4  # exact duplicates only: the 128-bit content hash is the one band
    interval = cfg.progress_interval or (1.0 if sys.stderr.isatty() else 30.0)
    return Plan(cfg, cfg.work, tuple(tuple(s) for s in shards), specials, bands, rows, workers, started, total,
                max(0.02, min(5.0, interval / 2)))


def fingerprint(plan: Plan) -> dict[str, Any]:
    """What a work directory's intermediate files depend on: a rerun with the same continues from them."""
    cfg = plan.cfg
    inputs = [[str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns] for p in cfg.inputs]
    settings = {k: v for k, v in asdict(cfg).items() if k in (
        "format", "tokenizer", "min_chars", "max_chars", "min_ja_ratio", "dedup", "near_dedup",
        "near_dedup_threshold", "num_perm", "val_fraction", "append_eos")}
    return {"version": PLAN_VERSION, "inputs": inputs, "settings": settings, "tasks": plan.tasks}


def record_resume(work: WorkDir, plan: Plan) -> str:
    """Note (for the report) what an earlier run of this work directory finished; '' if nothing."""
    done = {stage: len(work.completed(stage)) for stage in ("count", "clean", "buckets", "clusters", "tokenize")}
    done = {stage: n for stage, n in done.items() if n}
    work.write_json(work.sub("resume.json"), {"tasks_finished_before": done} if done else {})
    work.write_json(work.sub("plan.json"), [[asdict(p) for p in shard] for shard in plan.shards])
    if not done:
        return ""
    return (f"{done.get('clean', 0)} of {plan.tasks} shards already cleaned, "
            f"{done.get('tokenize', 0)} already tokenised by an earlier run")


def stages(plan: Plan, work: WorkDir) -> list[tuple[str, list, int]]:
    """(name, datatrove pipeline, tasks) in the order they run."""
    out = []
    if any(piece.split for shard in plan.shards for piece in shard):
        out.append(("count", [CountLines(plan)], plan.tasks))
    clean = [ReadShard(plan), CleanAndFilter(plan)]
    if plan.cfg.dedup:
        clean.append(CharMinhashSignature(plan))
    out.append(("clean", [*clean, WriteSurvivors(plan)], plan.tasks))
    if plan.cfg.dedup:
        out.append(("buckets", [MinhashDedupBuckets(str(work.sub("signatures")), str(work.sub("dups")),
                                                    config=minhash_config(plan),
                                                    lines_to_buffer=BUCKET_READ_BUFFER)], plan.bands))
        out.append(("clusters", [VerifiedClusters(plan)], 1))
    out.append(("tokenize", [TokenizeShard(plan)], plan.tasks))
    out.append(("merge", [MergeShards(plan)], 1))
    return out


# --- the tokenizer of tokenize tasks ------------------------------------------------------------

_TOKENIZERS: dict[str, Any] = {}


def preload(cfg, tok) -> None:
    """The tokenizer the launcher checked: local tasks are forked and inherit it."""
    _TOKENIZERS[cfg.tokenizer] = tok


def _tokenizer(cfg):
    if cfg.tokenizer not in _TOKENIZERS:
        _TOKENIZERS[cfg.tokenizer] = prep.load_tokenizer(cfg)
    return _TOKENIZERS[cfg.tokenizer]


def _encode(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of a batch in one call of the Rust tokenizer (what `tok(texts)` does, less the Python)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return tok(texts, add_special_tokens=False)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]


# --- steps --------------------------------------------------------------------------------------

class _Step(PipelineStep):
    type = "jp-peft"

    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan

    @property
    def work(self) -> WorkDir:
        return WorkDir(self.plan.work)


def reject_line(input_index: int, line: int, record: dict[str, Any]) -> str:
    return f"{input_index:06d}:{line:012d}:" + json.dumps(record, ensure_ascii=False) + "\n"


def _reject_record(source: str, line: int, reason: str, detail: str, raw: str, raw_b64: str) -> dict[str, Any]:
    record = {"source": source, "line": line, "reason": reason, "detail": detail, "raw": raw}
    if raw_b64:  # the exact bytes, when they were not valid UTF-8 (raw then shows U+FFFD)
        record["raw_b64"] = raw_b64
    return record


class CountLines(_Step):
    name = "count lines"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        counts = {f"{p.input}:{p.start}": count_newlines(p.path, p.start, p.end)
                  for p in self.plan.shards[rank] if p.split}
        self.work.write_json(self.work.rank_file("lines", rank, ".json"), counts)


class ReadShard(_Step):
    """The shard's raw records in input order, each with its file and line (a datatrove reader)."""

    name = "read shard"

    def _first_lines(self, rank: int) -> dict[str, int]:
        """Line number of the first line of each split piece of this shard: the newlines before it."""
        wanted = {p.input for p in self.plan.shards[rank] if p.split and p.start > 0}
        counts: dict[str, int] = {}
        for other, shard in enumerate(self.plan.shards[:rank + 1]):
            if any(p.input in wanted for p in shard):
                counts.update(self.work.read_json(self.work.rank_file("lines", other, ".json"), {}))
        first = {}
        for piece in self.plan.shards[rank]:
            if piece.split and piece.start > 0:
                before = sum(n for key, n in counts.items()
                             if int(key.split(":")[0]) == piece.input and int(key.split(":")[1]) < piece.start)
                aligned = line_start_at_or_after(piece.path, piece.start)
                first[f"{piece.input}:{piece.start}"] = 1 + before + (1 if aligned > piece.start else 0)
        return first

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator:
        first = self._first_lines(rank)
        done = 0
        for piece in self.plan.shards[rank]:
            if piece.split:
                records = iter_records(piece.path, piece.start, piece.end, first.get(f"{piece.input}:{piece.start}", 1))
            else:
                records = iter_records(piece.path)
            length = piece.end - piece.start
            for record in records:
                record.input_index = piece.input
                record.input_pos = done + min(max(record.input_pos - piece.start, 0), length)
                yield record
            done += length


class _ProgressRecord:
    """A task's counts in progress/RANK.json, at most every `every` seconds (the launcher sums them)."""

    def __init__(self, work: WorkDir, rank: int, every: float):
        self.path, self.work, self.every, self.last = work.rank_file("progress", rank, ".json"), work, every, 0.0

    def update(self, read: int, kept: int, done_bytes: int, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            self.work.write_json(self.path, {"read": read, "kept": kept, "bytes": done_bytes})


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class CleanAndFilter(_Step):
    """Validation, NFKC cleaning and the Japanese filters (jp_peft.data.prepare._process_chunk); every
    reject is written with its reason (datatrove's exclusion writer, byte for byte); survivors go on."""

    name = "clean and filter"

    def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator:
        cfg = self.plan.cfg
        prep._init_worker(cfg, self.plan.specials)
        prep._WORKER["seconds"] = Counter()
        progress = _ProgressRecord(self.work, rank, self.plan.progress_every)
        rejected: Counter = Counter()
        read = passed = done = 0
        started = time.perf_counter()
        path = self.work.rank_file("rejected", rank, ".jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as rejects:
            for chunk in _chunks(data, prep.CHUNK_RECORDS):
                for item in prep._process_chunk(chunk):  # looked up here: tests replace it
                    read += 1
                    if item.reason is None:
                        passed += 1
                        yield item
                        continue
                    if cfg.strict:
                        raise prep.strict_error(item.source, item.line, item.reason, item.detail)
                    rejected[item.reason] += 1
                    rejects.write(reject_line(item.input_index, item.line, _reject_record(
                        item.source, item.line, item.reason, item.detail, item.raw, item.raw_b64)))
                done = chunk[-1].input_pos
                progress.update(read, passed, done)
        progress.update(read, passed, sum(p.end - p.start for p in self.plan.shards[rank]), force=True)
        seconds = dict(prep._WORKER["seconds"]) | {"task": time.perf_counter() - started}
        self.work.write_json(self.work.rank_file("stats_clean", rank, ".json"), {
            "read": read, "passed": passed, "rejected": dict(rejected),
            "bytes": sum(p.end - p.start for p in self.plan.shards[rank]), "seconds": seconds})


class WriteSurvivors(_Step):
    """The records that passed, cleaned, with their raw bytes (a duplicate is rejected byte for byte)."""

    name = "write survivors"

    def run(self, data, rank: int = 0, world_size: int = 1):
        path = self.work.rank_file("survivors", rank, ".jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as out:
            for item in data:
                record = {"i": item.input_index, "s": item.source, "l": item.line, "r": item.raw, "t": item.text,
                          "c": item.chars, "h": item.hash}
                if item.raw_b64:
                    record["b"] = item.raw_b64
                if item.examples:
                    record["e"] = item.examples
                out.write(json.dumps(record, ensure_ascii=False) + "\n")



class TokenizeShard(_Step):
    """Duplicates out (rejected with reason, byte for byte), the rest tokenised in batches by the Rust
    tokenizer into the shard's indexed datasets (EOS after every document) or its ChatML examples."""

    name = "tokenize shard"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        cfg, work = self.plan.cfg, self.work
        tok = _tokenizer(cfg)
        started = time.perf_counter()
        duplicates_path = work.rank_file("duplicates", rank, ".bin")
        duplicates = np.fromfile(duplicates_path, dtype=DUPLICATE_DTYPE) if duplicates_path.exists() else \
            np.zeros(0, dtype=DUPLICATE_DTYPE)
        prefix = work.shard_prefix(rank)
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        writer = _ShardWriter(cfg, prefix, tok)
        rejected: Counter = Counter()
        batch: list[dict[str, Any]] = []
        next_dup = 0
        with open(work.rank_file("survivors", rank, ".jsonl"), encoding="utf-8") as survivors, \
                open(prefix + ".dups.jsonl", "w", encoding="utf-8") as rejects:
            for doc, line in enumerate(survivors):
                record = json.loads(line)
                if next_dup < len(duplicates) and duplicates[next_dup]["doc"] == doc:
                    reason, detail = _duplicate_reason(cfg, record, duplicates[next_dup])
                    next_dup += 1
                    if cfg.strict:
                        raise prep.strict_error(record["s"], record["l"], reason, detail)
                    rejected[reason] += 1
                    rejects.write(reject_line(record["i"], record["l"], _reject_record(
                        record["s"], record["l"], reason, detail, record["r"], record.get("b", ""))))
                    continue
                batch.append(record)
                if len(batch) == TOKENIZE_BATCH:
                    writer.add(batch)
                    batch = []
            writer.add(batch)
        writer.finish()
        work.write_json(work.rank_file("stats_tokenize", rank, ".json"), {
            **writer.counts, "rejected": dict(rejected),
            "seconds": {"tokenize": writer.seconds, "task": time.perf_counter() - started}})


def _duplicate_reason(cfg, record: dict[str, Any], dup) -> tuple[str, str]:
    kept = f"{cfg.inputs[int(dup['kept_input'])]}:{int(dup['kept_line'])}"
    if dup["exact"]:
        return "exact_duplicate", f"hash {record['h']}, the same text as {kept}"
    return "near_duplicate", f"estimated Jaccard {float(dup['similarity']):.2f} with {kept}"


class _ShardWriter:
    """A shard's train/validation outputs; documents are split by their own hash (deterministic)."""

    def __init__(self, cfg, prefix: str, tok):
        self.cfg, self.tok, self.prefix = cfg, tok, prefix
        self.counts: Counter = Counter()
        self.seconds = 0.0
        self.builders, self.files = {}, {}
        for split in ("train", "validation"):  # both always: the merge reads every shard alike
            if cfg.format == "text":
                self.builders[split] = IndexedDatasetWriter(prefix + TEXT_SPLITS[split])
            else:
                self.files[split] = open(f"{prefix}.{CHAT_SPLITS[split]}", "w", encoding="utf-8")

    def add(self, batch: list[dict[str, Any]]) -> None:
        if not batch:
            return
        started = time.perf_counter()
        if self.cfg.format == "text":
            encoded = _encode(self.tok, [record["t"] for record in batch])
        else:
            texts = [chat.example_text(e) for record in batch for e in record["e"]]
            lengths = iter(len(ids) for ids in _encode(self.tok, texts))
        self.seconds += time.perf_counter() - started
        for i, record in enumerate(batch):
            split = "validation" if prep.is_validation(record["h"], self.cfg.val_fraction) else "train"
            if self.cfg.format == "text":
                ids = encoded[i]
                self.counts["tokens"] += len(ids)
                if self.cfg.append_eos:
                    ids.append(self.tok.eos_token_id)
                self.builders[split].add_document(np.asarray(ids, dtype=TOKEN_DTYPE))
            else:
                for example in record["e"]:
                    self.counts["tokens"] += next(lengths)
                    self.files[split].write(json.dumps(example, ensure_ascii=False) + "\n")
                self.counts[f"examples_{split}"] += len(record["e"])
            self.counts[f"kept_{split}"] += 1
            self.counts["chars"] += record["c"]

    def finish(self) -> None:
        for builder in self.builders.values():
            builder.finalize()
        for handle in self.files.values():
            handle.close()


class MergeShards(_Step):
    """The shards' outputs concatenated in shard order into the final files (temporary names until the
    end), the rejects merged back into input order, and the report, which reconciles for the whole
    run and for every shard."""

    name = "merge shards"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        cfg, work = self.plan.cfg, self.work
        outputs = PreparedOutputs(cfg.output_prefix, cfg.format, cfg.val_fraction)
        try:
            totals, shards, seconds = _Totals(), [], Counter()
            for shard in range(self.plan.tasks):
                clean = work.read_json(work.rank_file("stats_clean", shard, ".json"))
                tokenized = work.read_json(work.rank_file("stats_tokenize", shard, ".json"))
                outputs.append_shard(work.shard_prefix(shard))
                with open(work.rank_file("rejected", shard, ".jsonl"), encoding="utf-8") as first, \
                        open(work.shard_prefix(shard) + ".dups.jsonl", encoding="utf-8") as second:
                    for line in heapq.merge(first, second):
                        outputs.rejected.write(line[KEY_WIDTH:])
                shards.append(totals.add(shard, clean, tokenized))
                seconds.update({f"clean.{k}": v for k, v in clean["seconds"].items()})
                seconds.update({f"tokenize.{k}": v for k, v in tokenized["seconds"].items()})
            totals.values["seconds"] = time.time() - self.plan.started
            extra = {"workers": self.plan.workers, "executor": cfg.executor, "tasks": self.plan.tasks,
                     "resumed": work.read_json(work.sub("resume.json"), {}),
                     "retried": work.read_json(work.sub("retried.json"), {}),
                     "task_seconds": _task_seconds(work, seconds)}
            report = prep.build_report(cfg, totals.values, shards, extra)
            if report["kept_train"] == 0:
                report["error"] = prep.nothing_to_train_on(report, cfg)
                outputs.commit(report, with_datasets=False)  # the rejects are kept aside all the same
                raise NothingKeptError(report["error"])
            outputs.commit(report)
        except NothingKeptError:
            raise
        except BaseException:
            outputs.abort()
            raise


class _Totals:
    def __init__(self):
        self.values: dict[str, Any] = Counter()
        self.values["rejected"] = Counter()

    def add(self, shard: int, clean: dict, tokenized: dict) -> dict[str, int]:
        v = self.values
        v["read"] += clean["read"]
        v["bytes_read"] += clean["bytes"]
        v["rejected"].update(clean["rejected"])
        v["rejected"].update(tokenized["rejected"])
        for key in ("kept_train", "kept_validation", "examples_train", "examples_validation", "chars", "tokens"):
            v[key] += tokenized.get(key, 0)
        kept = tokenized.get("kept_train", 0) + tokenized.get("kept_validation", 0)
        return {"shard": shard, "read": clean["read"], "kept": kept,
                "rejected": sum(clean["rejected"].values()) + sum(tokenized["rejected"].values())}


def _task_seconds(work: WorkDir, steps: Counter) -> dict[str, Any]:
    """Where the time went: task-seconds per stage (summed over its tasks) and per step of the work."""
    per_stage: Counter = Counter()
    for path in work.sub("timing").glob("*.json"):
        record = work.read_json(path, {})
        per_stage[record.get("stage", "?")] += record.get("seconds", 0.0)
    return {"stages": {k: round(v, 3) for k, v in per_stage.items()},
            "steps": {k: round(v, 3) for k, v in sorted(steps.items())}}

"""The near-duplicate stages of `jp-peft data prepare` (jp_peft.data.pipeline runs them): MinHash signatures
of every surviving record over character 5-grams, written as datatrove's sorted signature files, and the
clusters of candidate pairs verified on the full signature.

Split from pipeline.py because these subclass datatrove's own MinHash steps and depend on their file
formats (datatrove 0.3.0 dedup/minhash.py); the rest of the pipeline does not.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupCluster, MinhashDedupSignature
from datatrove.utils.binaryio import read_tuples_from_file
from datatrove.utils.hashing import HashConfig

from jp_peft.data.dedup import shingle_hashes
from jp_peft.data.workdir import WorkDir

SPILL_DOCS = 100_000  # signatures held in memory by a clean task before a sorted run goes to disk
BUCKET_READ_BUFFER = 256  # signature records read at a time per file by the buckets stage
DUPLICATE_DTYPE = np.dtype([("doc", "<u4"), ("exact", "u1"), ("similarity", "<f4"), ("kept_input", "<u4"),
                            ("kept_line", "<u8")])


def minhash_config(plan) -> MinhashConfig:
    return MinhashConfig(n_grams=5, num_buckets=plan.bands, hashes_per_bucket=plan.rows,
                         hash_config=HashConfig(precision=32))


def meta_dtype(plan) -> np.dtype:
    width = plan.cfg.num_perm if plan.cfg.near_dedup else 4
    return np.dtype([("hash", "<u4", (4,)), ("input", "<u4"), ("line", "<u8"), ("sig", "<u4", (width,))])


def hash_words(doc_hash: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(doc_hash), dtype="<u4")


class _SortedRuns:
    """Signatures of one shard, written as datatrove's sorted signature files (one per band):
    `<rows x uint32 hash><uint32 doc index>` records sorted by hash. At most SPILL_DOCS are held in
    memory; beyond that sorted runs go to disk and are merged at the end."""

    def __init__(self, folder: Path, rank: int, bands: int, rows: int):
        self.folder, self.rank, self.bands, self.rows = folder, rank, bands, rows
        self.sigs = np.empty((1024, bands * rows), dtype=np.uint32)
        self.ids = np.empty(1024, dtype=np.uint32)
        self.n = 0
        self.runs: list[list[Path]] = []  # per run: one file per band

    def add(self, doc: int, sig: np.ndarray) -> None:
        if self.n == len(self.ids):
            if self.n >= SPILL_DOCS:
                self._spill()
            else:
                self.sigs = np.concatenate([self.sigs, np.empty_like(self.sigs)])
                self.ids = np.concatenate([self.ids, np.empty_like(self.ids)])
        self.sigs[self.n] = sig[:self.bands * self.rows]
        self.ids[self.n] = doc
        self.n += 1

    def _sorted_band(self, band: int) -> np.ndarray:
        cols = self.sigs[:self.n, band * self.rows:(band + 1) * self.rows]
        ids = self.ids[:self.n]
        order = np.lexsort([ids, *(cols[:, r] for r in reversed(range(self.rows)))])
        return np.column_stack([cols[order], ids[order]]).astype("<u4")

    def _final(self, band: int) -> Path:
        return self.folder / f"bucket_{band:03d}" / f"{self.rank:05d}.minhash.sig"

    def _spill(self) -> None:
        files = []
        for band in range(self.bands):
            path = self.folder / "runs" / f"{self.rank:05d}.{len(self.runs)}.{band:03d}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self._sorted_band(band).tobytes())
            files.append(path)
        self.runs.append(files)
        self.n = 0

    def finish(self) -> None:
        for band in range(self.bands):
            self._final(band).parent.mkdir(parents=True, exist_ok=True)
        if not self.runs:
            for band in range(self.bands):
                self._final(band).write_bytes(self._sorted_band(band).tobytes())
            return
        if self.n:
            self._spill()
        width = self.rows + 1
        for band in range(self.bands):
            sources = [np.memmap(run[band], dtype="<u4", mode="r").reshape(-1, width) for run in self.runs]
            with open(self._final(band), "wb") as out:
                for row in heapq.merge(*(map(tuple, s) for s in sources)):
                    out.write(np.asarray(row, dtype="<u4").tobytes())
            del sources
        for run in self.runs:
            for path in run:
                path.unlink(missing_ok=True)


class CharMinhashSignature(MinhashDedupSignature):
    """datatrove's MinHash stage 1 for Japanese: shingles are character 5-grams of the cleaned text
    (no word tokenizer; jp_peft.data.dedup), signatures come from the clean step, and the files are
    datatrove's (32-bit hashes, one sorted file per band and shard) so that its buckets stage reads
    them. Also writes, per survivor, the content hash, file, line and full signature (doc_meta/), which
    the clusters stage uses to verify candidate pairs. Without near-dedup the one band is the content
    hash: exact duplicates only."""

    type = "jp-peft"
    name = "MinHash signatures (character 5-grams)"

    def __init__(self, plan):  # jp_peft.data.pipeline.Plan
        PipelineStep.__init__(self)  # not MinhashDedupSignature's: it loads a word tokenizer we do not use
        self.plan = plan
        self.output_folder = get_datafolder(str(WorkDir(plan.work).sub("signatures")))
        self.config = minhash_config(plan)
        self.num_hashes = plan.bands * plan.rows
        self._parameters = None
        self.language = "ja"

    def get_shingles(self, text: str) -> np.ndarray:
        return shingle_hashes(text).astype(np.uint64).reshape((-1, 1))

    def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator:
        work = WorkDir(self.plan.work)
        near = self.plan.cfg.near_dedup
        runs = _SortedRuns(work.sub("signatures"), rank, self.plan.bands, self.plan.rows)
        for stale in (work.sub("signatures", "runs")).glob(f"{rank:05d}.*"):
            stale.unlink()  # from a killed attempt of this task
        dtype = meta_dtype(self.plan)
        path = work.rank_file("doc_meta", rank, ".bin")
        path.parent.mkdir(parents=True, exist_ok=True)
        pending = np.zeros(4096, dtype=dtype)
        n = 0
        with open(path, "wb") as meta:
            for doc, item in enumerate(data):
                words = hash_words(item.hash)
                sig = item.signature if near else words
                runs.add(doc, sig)
                pending[n] = (words, item.input_index, item.line, sig)
                n += 1
                if n == len(pending):
                    meta.write(pending.tobytes())
                    n = 0
                yield item
            meta.write(pending[:n].tobytes())
        runs.finish()


class VerifiedClusters(MinhashDedupCluster):
    """datatrove's MinHash stage 3, with two changes for jp-peft's guarantees: a candidate pair from the
    buckets stage counts only if its estimated Jaccard on the full signature reaches
    --near-dedup-threshold (or the two are the same text), and each cluster keeps its first record
    in input order (datatrove keeps whichever its union order leaves as root). Writes, per shard,
    the survivors to drop with the reason and the record kept in their stead."""

    type = "jp-peft"
    name = "verified duplicate clusters"

    def __init__(self, plan):  # jp_peft.data.pipeline.Plan
        PipelineStep.__init__(self)
        self.plan = plan
        self.input_folder = get_datafolder(str(WorkDir(plan.work).sub("dups")))
        self.config = minhash_config(plan)
        self.lines_to_buffer = BUCKET_READ_BUFFER

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        work = WorkDir(self.plan.work)
        dtype, cfg = meta_dtype(self.plan), self.plan.cfg
        metas: dict[int, np.ndarray] = {}
        parent: dict[tuple[int, int], tuple[int, int]] = {}

        def meta(node):
            shard, doc = node
            if shard not in metas:
                metas[shard] = np.memmap(work.rank_file("doc_meta", shard, ".bin"), dtype=dtype, mode="r")
            return metas[shard][doc]

        def find(node):
            root = node
            while root in parent:
                root = parent[root]
            while node != root:
                parent[node], node = root, parent[node]
            return root

        def similarity(a, b) -> tuple[bool, float]:
            ma, mb = meta(a), meta(b)
            if np.array_equal(ma["hash"], mb["hash"]):
                return True, 1.0
            return False, float(np.mean(ma["sig"] == mb["sig"])) if cfg.near_dedup else 0.0

        for dup_file in self.input_folder.list_files(glob_pattern="*.dups"):
            with self.input_folder.open(dup_file, "rb") as handle:
                for f1, d1, f2, d2 in read_tuples_from_file(handle, "4I", lines_to_buffer=self.lines_to_buffer):
                    ra, rb = find((f1, d1)), find((f2, d2))
                    if ra == rb:
                        continue
                    exact, sim = similarity((f1, d1), (f2, d2))
                    if exact or (cfg.near_dedup and sim >= cfg.near_dedup_threshold):
                        low, high = min(ra, rb), max(ra, rb)
                        parent[high] = low
        dropped: dict[int, list] = defaultdict(list)
        for node in sorted(parent):
            kept = find(node)
            exact, sim = similarity(node, kept)
            kept_meta = meta(kept)
            dropped[node[0]].append((node[1], exact, sim, kept_meta["input"], kept_meta["line"]))
        folder = work.sub("duplicates")
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.bin"):
            stale.unlink()
        for shard, rows in dropped.items():
            np.array(rows, dtype=DUPLICATE_DTYPE).tofile(work.rank_file("duplicates", shard, ".bin"))

"""The work directory of a `jp-peft data prepare` run (PrepareConfig.work, --work-dir): the shard
plan, every stage's intermediate files and datatrove's completion marks. A rerun with the same
inputs and settings continues from the tasks that finished; a rerun with other inputs or settings
starts afresh. The directory is removed when the run ends, except after an interruption (SIGTERM,
a killed worker or Slurm task) that left finished tasks to continue from.

    fingerprint.json          inputs (path, size, mtime) and every setting that changes the outputs
    plan.json                 the shards: byte ranges of the inputs, in input order
    stages/NAME/              datatrove's logging dir per stage: completions/, logs/, stats/, slurm_logs/
    lines/RANK.json           newline counts of the split input ranges (line numbers of later ranges)
    rejected/RANK.jsonl       records rejected by validation and the filters, in input order
    survivors/RANK.jsonl      records that passed, cleaned, with their raw bytes
    doc_meta/RANK.bin         per survivor: content hash, source, line, full MinHash signature
    signatures/bucket_B/      datatrove MinHash signature files (one per shard and LSH band)
    dups/                     datatrove's candidate pairs, one file per band
    duplicates/RANK.bin       the survivors of a shard that are duplicates, with reason and the kept record
    shards/RANK*              a shard's indexed datasets (or examples), duplicate rejects, counts
    progress/RANK.json, timing/STAGE-RANK.json, errors/STAGE-RANK.json
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


class WorkDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def sub(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    def stage(self, name: str) -> Path:
        return self.sub("stages", name)

    def completed(self, stage: str) -> set[int]:
        done = self.stage(stage) / "completions"
        return {int(p.name) for p in done.iterdir()} if done.is_dir() else set()

    def rank_file(self, folder: str, rank: int, suffix: str) -> Path:
        return self.sub(folder, f"{rank:05d}{suffix}")

    def shard_prefix(self, rank: int) -> str:
        return str(self.sub("shards", f"{rank:05d}"))

    # --- small JSON records, written atomically ------------------------------------------------

    def write_json(self, path: Path, value: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    @staticmethod
    def read_json(path: Path, default: Any = None) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return default

    # --- lifecycle ----------------------------------------------------------------------------

    def open_for(self, fingerprint: dict[str, Any]) -> str | None:
        """Make the directory ready for a run with this fingerprint. Returns why an existing one was
        discarded, or None (new, or reused as it is)."""
        previous = self.read_json(self.sub("fingerprint.json"))
        why = None
        if self.path.exists() and previous != fingerprint:
            changed = sorted(k for k in {**(previous or {}), **fingerprint}
                             if (previous or {}).get(k) != fingerprint.get(k))
            why = f"it holds a run with other {', '.join(changed) or 'contents'}"
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_json(self.sub("fingerprint.json"), fingerprint)
        return why

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

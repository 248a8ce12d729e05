"""Data blends: the spec's weighted datasets -> NeMo's `paths=[w1, prefix1, w2, prefix2]`,
and the token ratio a run will actually see.

Both backends sample whole seq_length blocks by weight, so the effective token ratio equals
the normalised weights; what differs per dataset is how many epochs of it that costs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jp_peft.resources import expand_bundled
from jp_peft.spec import BlendEntry, SpecError, build, load_blend


def load_blend_entries(path: str, group_dir: str = "runs/qwen_lora_ja") -> list[BlendEntry]:
    """The blend's entries with {group_dir}, {bundled} and {repo} filled in; SpecError names file, entry and key."""
    entries = []
    for i, row in enumerate(load_blend(path)):
        where = f"{path}: datasets[{i}]"
        if not isinstance(row, dict):
            raise SpecError(f"{where}: expected a mapping (name, weight, prefix), got {type(row).__name__}")
        row = dict(row)
        if isinstance(row.get("prefix"), str):
            row["prefix"] = expand_bundled(row["prefix"].replace("{group_dir}", group_dir))
        if isinstance(row.get("source"), list):
            row["source"] = [expand_bundled(str(s)) for s in row["source"]]
        # build() names an unknown key and suggests the known one ("wieght" -> "weight").
        entries.append(build(BlendEntry, row, where))
    return entries


def nemo_blend_paths(entries: list[BlendEntry]) -> list:
    """[w1, prefix1, w2, prefix2, ...] with weights normalised to sum to 1 (Megatron's format)."""
    total = sum(e.weight for e in entries)
    out: list = []
    for entry in entries:
        out += [round(entry.weight / total, 6), entry.prefix]
    return out


def dataset_tokens(prefix: str) -> int | None:
    if not (Path(prefix + ".idx").exists() and Path(prefix + ".bin").exists()):
        return None
    from jp_peft.data import indexed_dataset_module

    # sequence_lengths is a view into the dataset's memory-mapped index, which IndexedDataset.__del__
    # unmaps: the dataset must outlive the sum (summing a temporary's view read freed memory: SIGSEGV).
    dataset = indexed_dataset_module().IndexedDataset(prefix)
    return int(np.sum(dataset.sequence_lengths, dtype=np.int64))


def blend_report(entries: list[BlendEntry], train_tokens: int | None) -> dict:
    total = sum(e.weight for e in entries)
    rows = []
    for entry in entries:
        share = entry.weight / total
        available = dataset_tokens(entry.prefix)
        row = {"name": entry.name, "weight": entry.weight, "token_share": round(share, 6), "prefix": entry.prefix,
               "tokens_available": available}
        if train_tokens:
            row["tokens_consumed"] = int(share * train_tokens)
            row["epochs"] = round(share * train_tokens / available, 4) if available else None
        rows.append(row)
    return {"datasets": rows, "train_tokens": train_tokens, "nemo_paths": nemo_blend_paths(entries)}

"""The export record: what a trained stage's export wrote (export.json), on either backend.

Written once by the export stage through `ExportRecord.write`; eval, compare, status and the next
stage read it back through `ExportRecord.read`, which names the file when it is missing or malformed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jp_peft.records.layout import MissingRecord, export_record, hf_merged, read_json, write_json
from jp_peft.spec import ExperimentSpec


@dataclass(frozen=True)
class ExportRecord:
    method: str  # the stage's method (jp_peft.spec.METHODS): what was exported follows it
    hf_merged: str  # the merged Hugging Face model (every method): what eval scores and SFT starts from
    hf_adapter: str | None  # the PEFT adapter; None under method full, which has none
    adapter_base: str | None  # the model the adapter applies to (the base, or the merged CPT model for SFT)
    # Parity checks, each {check, max_abs_diff, atol, ok, reason} (jp_peft.export.parity.check)
    checks: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: str | None = None  # Megatron: the trained checkpoint the export read
    nemo_merged: str | None = None  # Megatron: the merged NeMo checkpoint directory
    nemo: dict[str, Any] | str | None = None  # Megatron: the single-file .nemo archive (path, size, sha256)
    spec_fingerprint: str = ""  # of the spec that produced it (jp_peft.records.fingerprint)
    # Per artifact (hf_adapter, hf_merged, nemo): the targets it was verified on with the numbers, refused by
    # with the reason, or not verified here (jp_peft.export.deployability); {} in records of older exports.
    deployability: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # `jp-peft export gguf`: the GGUF files (path, bytes, sha256), their llama.cpp checks and, for a lora_embed
    # adapter, why it was not converted (jp_peft.export.gguf); {} until it ran.
    gguf: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: Path, needed_by: str = "export record") -> "ExportRecord":
        values = read_json(path, needed_by)
        if not isinstance(values, dict):
            raise MissingRecord(f"{path}: expected a JSON object, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [name for name in ("method", "hf_merged", "hf_adapter", "adapter_base") if name not in values]
        if missing:
            raise MissingRecord(f"{path}: missing field(s) {', '.join(missing)}; rerun the export stage")
        if not isinstance(values.get("deployability", {}), dict):
            raise MissingRecord(f"{path}: deployability is not an object of artifacts; rerun the export stage")
        return cls(**{k: v for k, v in values.items() if k in known})

    def check(self, name: str) -> dict[str, Any] | None:
        return next((c for c in self.checks if c.get("check") == name), None)


def stage_result_hf(spec: ExperimentSpec, stage: str) -> str:
    """The merged Hugging Face model a trained stage produced (what eval scores): the one its export record
    names, or on the hf backend without an export stage the one training wrote."""
    record = export_record(spec, stage)
    if record.exists():
        return ExportRecord.read(record, f"eval of {stage}").hf_merged
    if (hf_merged(spec, stage) / "config.json").exists():
        return str(hf_merged(spec, stage))
    raise MissingRecord(f"eval of {stage}: no exported Hugging Face model ({record} not found); "
                        "add the export stage")

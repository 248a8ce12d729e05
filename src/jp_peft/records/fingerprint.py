"""Whether a stage's record is current: the fingerprint of the spec that wrote it, and how two specs differ.

Every record a stage writes (metrics.json, export.json, summary.json, base.json) carries the fingerprint of
the resolved spec's fields that count for that stage (the stage table's fingerprint_sections); a rerun
keeps a stage only if its record's fingerprint is this spec's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from jp_peft.records import layout as rundir
from jp_peft.spec import ExperimentSpec
from jp_peft.spec.stages import TABLE, TRAIN, stage as stage_row

# Fields that say nothing about what a run computes: changing them is not a different run.
NOT_COMPARED = ("stages", "wandb")
# Sections that count only for the stages whose table row names them (fingerprint_sections): changing
# the eval section reruns the eval stage and keeps the trained ones.
EVAL_ONLY = tuple(section for row in TABLE for section in row.fingerprint_sections)
# Fields added after runs existed, left out while they hold their default: a run directory written
# before them keeps its fingerprints (and resumes) as long as the spec does not use them.
LATER_FIELDS = {("model", "quantization"): None, ("model", "quantization_compute_dtype"): None}


def comparable(spec_dict: dict[str, Any], stage: str | None = None) -> dict[str, Any]:
    """The fields that count for `stage`'s record. An optional stage's section (dpo) counts only in a run that
    has the stage, and there not for the other trained stages: adding dpo to a finished run, or changing
    dpo.beta, reruns dpo (its export, the eval), never cpt or sft."""
    other_trained = stage is not None and stage_row(stage).kind == TRAIN
    dropped = [row.section for row in TABLE if row.optional and row.section
               and (row.name not in spec_dict.get("stages", ()) or (other_trained and stage != row.name))]
    values = {k: v for k, v in spec_dict.items() if k not in NOT_COMPARED + EVAL_ONLY + tuple(dropped)}
    for (section, name), default in LATER_FIELDS.items():
        if isinstance(values.get(section), dict) and values[section].get(name, default) == default:
            values[section] = {k: v for k, v in values[section].items() if k != name}
    return values


def fingerprint(spec: ExperimentSpec, stage: str | None = None) -> str:
    """What a stage's record must carry to count as done for this spec: the comparable fields, plus the
    sections the stage's table row counts (the eval section for the eval stage). A trained stage's record is
    written with its own name (run/entry.run_train), as the runner checks it."""
    values = comparable(spec.to_dict(), stage)
    for section in stage_row(stage).fingerprint_sections if stage is not None else ():
        values[section] = spec.to_dict()[section]
    text = json.dumps(values, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finished_earlier(record: Path, spec_fingerprint: str) -> bool:
    """Whether a stage's record was written for the spec with this fingerprint (a current result)."""
    try:
        return rundir.read_json(record, "record").get("spec_fingerprint") == spec_fingerprint
    except (rundir.MissingRecord, AttributeError):
        return False


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted fields whose values differ, as `field: old -> new`."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += differences(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if old == new else [f"{path}: {json.dumps(old, ensure_ascii=False)} -> {json.dumps(new, ensure_ascii=False)}"]

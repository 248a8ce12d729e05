"""The stage metrics record: what a trained stage (cpt, sft) writes as metrics.json, on either backend.

Both backends measure the same things the same way -- token-mean cross-entropy on the first
blocks of the held-out Japanese and English indexed datasets, before the stage's first step and
after its last -- and write them through `StageMetrics`; eval, compare and the launcher read them
back through `read_stage_metrics`, which names the file and the field when something is off.
The gain/forgetting formulas (perplexity, in percent; downstream task averages, in points) live here too.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jp_peft.records.layout import MissingRecord, read_json, write_json


@dataclass(frozen=True)
class StageMetrics:
    stage: str
    backend: str
    steps: int  # optimizer steps done (max_steps when the stage ran to the end)
    base_model: str  # the Hugging Face model the stage started from (adapters name it as their base)
    # held-out token-mean cross-entropy of the starting model and of the trained one
    base_val_loss_ja: float
    base_val_loss_en: float
    val_loss_ja: float
    val_loss_en: float
    train_loss_first: float
    train_loss_last: float
    tokens_per_second: float  # trained tokens (real ones, padding excluded) per second of step time
    consumed_tokens: int
    trainable_params: int
    total_params: int
    wall_seconds: float
    precision: str
    resumed_from: str | None = None
    val_history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific facts (blend epochs, ...)
    method: str = "lora"  # what the stage trained (spec.METHODS); trainable_params follow it
    # Set when early stopping ended the stage before max_steps: the step it stopped at and why.
    early_stopped_at_step: int | None = None
    stop_reason: str | None = None
    spec_fingerprint: str = ""  # of the spec that produced it (jp_peft.records.fingerprint): a rerun keeps it only if equal

    @property
    def base_val_ppl_ja(self) -> float:
        return math.exp(self.base_val_loss_ja)

    @property
    def base_val_ppl_en(self) -> float:
        return math.exp(self.base_val_loss_en)

    @property
    def val_ppl_ja(self) -> float:
        return math.exp(self.val_loss_ja)

    @property
    def val_ppl_en(self) -> float:
        return math.exp(self.val_loss_en)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The fields, plus the derived perplexities (readers outside Python want them spelled out)."""
        out = dataclasses.asdict(self)
        for name in ("base_val_ppl_ja", "base_val_ppl_en", "val_ppl_ja", "val_ppl_en", "trainable_percent"):
            out[name] = getattr(self, name)
        return out

    def write(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_train_log(cls, path: Path, **fields) -> "StageMetrics":
        """The record of a finished stage: first/last training loss, tokens/s (real tokens over step time)
        and consumed tokens from its train log; everything else as given."""
        steps = step_rows(read_train_log(path))
        if not steps:
            raise MissingRecord(f"{path}: no training step logged")
        seconds = sum(row[STEP_TIME] for row in steps)
        tokens = sum(row[TOKENS_PER_S] * row[STEP_TIME] for row in steps)
        return cls(train_loss_first=steps[0][TRAIN_LOSS], train_loss_last=steps[-1][TRAIN_LOSS],
                   tokens_per_second=tokens / seconds if seconds else 0.0,
                   consumed_tokens=steps[-1][CONSUMED_TOKENS], **fields)


_FIELDS = {f.name: f for f in dataclasses.fields(StageMetrics)}


def read_stage_metrics(path: Path) -> StageMetrics:
    """Read metrics.json back; a missing or malformed file names the file and the field."""
    values = read_json(path, "stage metrics")
    if not isinstance(values, dict):
        raise MissingRecord(f"{path}: expected a JSON object, got {type(values).__name__}")
    required = [name for name, f in _FIELDS.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise MissingRecord(f"{path}: missing field(s) {', '.join(missing)}; written by an older jp-peft? rerun the stage")
    for name in ("base_val_loss_ja", "base_val_loss_en", "val_loss_ja", "val_loss_en"):
        if not isinstance(values[name], (int, float)) or not math.isfinite(values[name]):
            raise MissingRecord(f"{path}: {name} = {values[name]!r} is not a finite number")
    return StageMetrics(**{k: v for k, v in values.items() if k in _FIELDS})


def relative_gain(before: float, after: float) -> float:
    """Japanese gain in percent: how much lower the perplexity is than the starting model's."""
    return 100.0 * (before - after) / before


def relative_forgetting(before: float, after: float) -> float:
    """English forgetting in percent: how much higher the perplexity is than the starting model's."""
    return 100.0 * (after - before) / before


def downstream_gain(base_avg: float | None, avg: float | None) -> float | None:
    """Japanese downstream gain in points: the model's task average minus the base model's (None if unknown)."""
    return None if base_avg is None or avg is None else avg - base_avg


def downstream_forgetting(base_avg: float | None, avg: float | None) -> float | None:
    """English downstream forgetting in points: how far the task average fell below the base model's."""
    return None if base_avg is None or avg is None else base_avg - avg


def params_record(trainable: int, total: int, method: str) -> dict:
    """The trainable-parameter counts a stage logs to W&B's config (both backends: one shape)."""
    return {"params": {"trainable": trainable, "total": total, "method": method,
                       "trainable_percent": 100.0 * trainable / total}}

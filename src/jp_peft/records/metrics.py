"""The stage metrics record: what a trained stage (cpt, sft, dpo) writes as metrics.json, on either backend.

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

# The keys of a stage's train_log.jsonl rows (one per optimizer step, one per validation) and of its W&B
# history: both backends write them through this module, compare and status read them.
STEP = "trainer/global_step"
TRAIN_LOSS = "train/loss"
STEP_TIME = "perf/step_time_s"
TOKENS_PER_S = "perf/tokens_per_s"
CONSUMED_TOKENS = "perf/consumed_tokens"
LEARNING_RATE = "train/lr"
TFLOPS_PER_S = "perf/tflops_per_s"
MFU = "perf/mfu"  # only where the device's peak is known (training/flops.peak_tflops)
JA_PPL_GAIN = "val/ja_ppl_gain"  # fractions of the stage's starting perplexity (validation_row)
EN_PPL_FORGETTING = "val/en_ppl_forgetting"
LANGUAGES = ("ja", "en")  # held-out sets: the Japanese gain, the English forgetting
# The dpo stage's validation rows (backends/hf/dpo.py): on the validation pairs, the share whose implicit reward
# (beta x the policy's log-probability ratio to the reference) is higher for chosen than for rejected, and the
# mean of chosen minus rejected reward. metrics.json has their first and last values in `extra`.
REWARD_ACCURACY = "val/dpo_reward_accuracy"
REWARD_MARGIN = "val/dpo_reward_margin"


def val_loss_key(lang: str) -> str:
    return f"val/{lang}_loss"


def val_ppl_key(lang: str) -> str:
    return f"val/{lang}_ppl"


def validation_row(step: int, losses: dict[str, float], baseline: dict[str, float] | None,
                   consumed_tokens: int | None = None) -> dict[str, Any]:
    """One validation's row: each language's loss and perplexity and, against the starting model's
    losses, the Japanese gain and the English forgetting as fractions of its perplexity; with the tokens
    the stage had trained on, when given (W&B plots a metric against another only within one logged row:
    the workspace's validation panels use them as x-axis)."""
    row: dict[str, Any] = {STEP: step}
    if consumed_tokens is not None:
        row[CONSUMED_TOKENS] = consumed_tokens
    for lang, loss in losses.items():
        row[val_loss_key(lang)] = loss
        row[val_ppl_key(lang)] = math.exp(loss)
    if baseline and "ja" in baseline and "ja" in losses:
        row[JA_PPL_GAIN] = gain_fraction(math.exp(baseline["ja"]), math.exp(losses["ja"]))
    if baseline and "en" in baseline and "en" in losses:
        row[EN_PPL_FORGETTING] = forgetting_fraction(math.exp(baseline["en"]), math.exp(losses["en"]))
    return row


def read_train_log(path: Path) -> list[dict[str, Any]]:
    """Every row of a train_log.jsonl (steps and validations), in order."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def step_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if TRAIN_LOSS in row]


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


def gain_fraction(before: float, after: float) -> float:
    """Japanese gain: how much lower the perplexity is than the starting model's, as a fraction of it.
    The one formula: validation rows, metrics, the summary and compare all come here."""
    return (before - after) / before


def forgetting_fraction(before: float, after: float) -> float:
    """English forgetting: how much higher the perplexity is than the starting model's, as a fraction of it."""
    return (after - before) / before


def relative_gain(before: float, after: float) -> float:
    """Japanese gain in percent (gain_fraction x 100)."""
    return 100.0 * gain_fraction(before, after)


def relative_forgetting(before: float, after: float) -> float:
    """English forgetting in percent (forgetting_fraction x 100)."""
    return 100.0 * forgetting_fraction(before, after)


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

"""The downstream summary of an experiment's eval/results.json: one score per task, the Japanese and
English averages of every model, and the gain/forgetting against base (jp_peft.records.metrics owns the formula).

Light on purpose (no lm-eval, no torch): the eval stage, the printed table and `jp-peft compare` read it.
"""

from __future__ import annotations

import math
from statistics import fmean
from typing import Any

from jp_peft.records.metrics import downstream_forgetting, downstream_gain

BASE = "base"
# The metric a task is scored by: accuracy where the task has it (every multiple-choice task), else the
# first metric lm-eval reports as higher-is-better (generation tasks: exact match, F1, ROUGE).
PREFERRED_METRICS = ("acc",)


def primary_metric(task: dict[str, Any]) -> str:
    """The name of the metric that scores `task` (a task entry of a harness record)."""
    metrics = task["metrics"]
    for name in PREFERRED_METRICS:
        if name in metrics:
            return name
    higher = task.get("higher_is_better") or {}
    better = [name for name in metrics if higher.get(name.split(",")[0]) is True]
    if better:
        return better[0]
    if not metrics:
        raise ValueError("a task without metrics")
    return next(iter(metrics))


def task_score(task: dict[str, Any]) -> dict[str, Any]:
    """{"metric", "value", "stderr"} of a task entry; value and stderr in lm-eval's units (0-1)."""
    metric = primary_metric(task)
    return {"metric": metric, **task["metrics"][metric]}


def _points(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return fmean(present) if present and len(present) == len(values) else None


def mean_stderr(stderrs: list[float | None]) -> float | None:
    """The standard error of a mean of independent task scores: sqrt(sum of squares) / count
    (None when a task has none, e.g. lm-eval's N/A for a single item)."""
    if not stderrs or any(s is None or not math.isfinite(s) for s in stderrs):
        return None
    return math.sqrt(sum(s * s for s in stderrs)) / len(stderrs)


def _stderr(task: dict[str, Any]) -> float | None:
    value = task.get("stderr")
    return _points(value) if isinstance(value, (int, float)) else None


def downstream_summary(results: dict[str, Any]) -> dict[str, Any]:
    """results.json -> {"tasks_ja", "tasks_en", "models": {name: {"scores": {task: points}, "stderr": {task:
    points}, "ja_avg", "en_avg", "ja_avg_stderr", "en_avg_stderr", "ja_gain", "en_forgetting"}}}. Averages
    are plain means over the tasks in points (None when a list is empty), their stderr lm-eval's task
    stderrs combined by mean_stderr; gain and forgetting are in points against base (None for base itself)."""
    tasks_ja, tasks_en = list(results["tasks_ja"]), list(results["tasks_en"])
    models: dict[str, dict[str, Any]] = {}
    for name, record in results["models"].items():
        scores = {task: _points(record["tasks"][task]["value"]) for task in tasks_ja + tasks_en}
        stderr = {task: _stderr(record["tasks"][task]) for task in tasks_ja + tasks_en}
        models[name] = {"scores": scores, "stderr": stderr, "ja_avg": _mean([scores[t] for t in tasks_ja]),
                        "en_avg": _mean([scores[t] for t in tasks_en]),
                        "ja_avg_stderr": mean_stderr([stderr[t] for t in tasks_ja]),
                        "en_avg_stderr": mean_stderr([stderr[t] for t in tasks_en])}
    base = models.get(BASE, {})
    for name, row in models.items():
        other = name != BASE
        row["ja_gain"] = downstream_gain(base.get("ja_avg"), row["ja_avg"]) if other else None
        row["en_forgetting"] = downstream_forgetting(base.get("en_avg"), row["en_avg"]) if other else None
    return {"tasks_ja": tasks_ja, "tasks_en": tasks_en, "models": models}


def _cell(value: float | None, signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def format_downstream(summary: dict[str, Any], title: str = "") -> str:
    """The downstream table: a row per model, a column per task, then JA avg, EN avg, gain, forgetting
    (all in points; gain = avg - base avg, forgetting = base EN avg - EN avg)."""
    tasks = summary["tasks_ja"] + summary["tasks_en"]
    header = ["model", *tasks, "JA avg", "EN avg", "JA gain", "EN forget"]
    rows = [header]
    for name, row in summary["models"].items():
        rows.append([name, *(_cell(row["scores"][t]) for t in tasks), _cell(row["ja_avg"]), _cell(row["en_avg"]),
                     _cell(row["ja_gain"], True), _cell(row["en_forgetting"], True)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    langs = ", ".join(f"{t} ({'JA' if t in summary['tasks_ja'] else 'EN'})" for t in tasks)
    head = f"\n{title}downstream tasks, points (accuracy x 100): {langs}" if tasks else ""
    return "\n".join([head, *lines])

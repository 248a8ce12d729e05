"""The one-line progress of a training stage, as the stage's log and the launcher's terminal show it."""

from __future__ import annotations

import json
from pathlib import Path


def progress_line(stage: str, step: int, max_steps: int, loss: float | None, tokens_per_s: float,
                  step_seconds: list[float]) -> str:
    """`[jp-peft] cpt step 12/40 loss 6.5123 3,410 tok/s ETA 0:00:15`: what the launcher shows per stage."""
    recent = step_seconds[-20:]
    eta = int(sum(recent) / len(recent) * max(max_steps - step, 0)) if recent else 0
    loss_text = f"{loss:.4f}" if loss is not None else "n/a"
    return (f"[jp-peft] {stage} step {step}/{max_steps} loss {loss_text} {tokens_per_s:,.0f} tok/s "
            f"ETA {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}")


def latest_progress(train_log: Path, label: str, max_steps: int, since: float = 0.0) -> tuple[int, str] | None:
    """(step, progress line) of the newest training row in a stage's train_log.jsonl, or None when it
    has none yet (or only rows older than `since`, a time.time() value: a previous attempt's log)."""
    try:
        if train_log.stat().st_mtime < since:
            return None
        lines = train_log.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return None
    rows = []
    for line in lines:
        if '"train/loss"' in line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # the line being written right now
                continue
    if not rows:
        return None
    row = rows[-1]
    step = row["trainer/global_step"]
    return step, progress_line(label, step, max_steps, row["train/loss"], row["perf/tokens_per_s"],
                               [r["perf/step_time_s"] for r in rows])

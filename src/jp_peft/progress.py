"""The one-line progress of a training stage, as the stage's log and the launcher's terminal show it."""

from __future__ import annotations


def progress_line(stage: str, step: int, max_steps: int, loss: float | None, tokens_per_s: float,
                  step_seconds: list[float]) -> str:
    """`[jp-peft] cpt step 12/40 loss 6.5123 3,410 tok/s ETA 0:00:15`: what the launcher shows per stage."""
    recent = step_seconds[-20:]
    eta = int(sum(recent) / len(recent) * max(max_steps - step, 0)) if recent else 0
    loss_text = f"{loss:.4f}" if loss is not None else "n/a"
    return (f"[jp-peft] {stage} step {step}/{max_steps} loss {loss_text} {tokens_per_s:,.0f} tok/s "
            f"ETA {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}")

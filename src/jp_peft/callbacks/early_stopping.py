"""Early stopping of a trained stage on its Japanese validation loss.

`PatienceRule` is the decision alone (a sequence of losses in, stop or not out), so it is tested
without a trainer; `EarlyStopping` feeds it the `val/ja_loss` of each validation the module records
in `val_history` and, when it fires, ends the stage cleanly and says at which step and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning.pytorch as pl

MONITOR = "val/ja_loss"


@dataclass
class PatienceRule:
    """Stop after `patience` validations in a row that do not beat the best loss by more than `min_delta`."""

    patience: int
    min_delta: float = 0.0
    best: float = math.inf
    best_step: int | None = None
    bad: int = 0

    def update(self, step: int, loss: float) -> bool:
        if not math.isfinite(loss):  # a diverged stage stops at once; nothing will come back from NaN
            self.bad = self.patience
            return True
        if loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad = loss, step, 0
            return False
        self.bad += 1
        return self.bad >= self.patience

    def reason(self) -> str:
        return (f"{MONITOR} did not improve by more than {self.min_delta:g} for {self.patience} validation(s); "
                f"best {self.best:.4f} at step {self.best_step}")


class EarlyStopping(pl.Callback):
    """Watches the module's `val_history` rows; its state travels in checkpoints so a resumed stage keeps counting."""

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.rule = PatienceRule(patience, min_delta)
        self.stopped_at_step: int | None = None
        self.stop_reason: str | None = None
        self._seen = 0

    def on_validation_end(self, trainer, pl_module):
        history = getattr(pl_module, "val_history", [])
        if trainer.sanity_checking or len(history) <= self._seen:
            return
        self._seen = len(history)
        row = history[-1]
        if MONITOR in row and self.rule.update(row["trainer/global_step"], row[MONITOR]):
            self.stopped_at_step, self.stop_reason = trainer.global_step, self.rule.reason()
            trainer.should_stop = True
            print(f"[jp-peft] early stopping at step {self.stopped_at_step}: {self.stop_reason}", flush=True)

    def state_dict(self):
        return {"best": self.rule.best, "best_step": self.rule.best_step, "bad": self.rule.bad,
                "stopped_at_step": self.stopped_at_step, "stop_reason": self.stop_reason}

    def load_state_dict(self, state):
        self.rule.best, self.rule.best_step, self.rule.bad = state["best"], state["best_step"], state["bad"]
        self.stopped_at_step, self.stop_reason = state.get("stopped_at_step"), state.get("stop_reason")

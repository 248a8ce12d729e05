"""Early stopping of a trained stage on its Japanese validation loss.

`PatienceRule` is the decision alone (a sequence of losses in, stop or not out), so it is tested
without a trainer; `EarlyStopping` feeds it the `val/ja_loss` of each validation the module records
in `val_history` and, when it fires, ends the stage cleanly and says at which step and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning.pytorch as pl

from jp_peft.records.metrics import STEP, val_loss_key

MONITOR = val_loss_key("ja")


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
    """Watches the per-language validation rows of the stage: the hf module's `val_history`, or on the Megatron
    backend the LanguageValidation callback's `history` (list this callback after it). The rule is replayed
    over the whole history at each check; both backends restore that history on resume, so a resumed stage
    keeps counting where it stopped without state of its own. The step-0 row (the base model, measured
    before training) is not a validation of this stage."""

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, min_delta
        self.rule = PatienceRule(patience, min_delta)
        self.stopped_at_step: int | None = None
        self.stop_reason: str | None = None
        self._seen = -1

    @staticmethod
    def history(trainer, pl_module) -> list[dict]:
        if hasattr(pl_module, "val_history"):
            return pl_module.val_history
        # A backend whose module keeps no history has a callback that validates and keeps it (Megatron's
        # LanguageValidation), marked VALIDATION_HISTORY: this module need not know that backend
        for callback in trainer.callbacks:
            if getattr(callback, "VALIDATION_HISTORY", False):
                return callback.history
        raise RuntimeError("early stopping: no validation history (neither the module's val_history nor a "
                           "callback with VALIDATION_HISTORY, e.g. Megatron's LanguageValidation)")

    def check(self, trainer, pl_module) -> None:
        rows = [r for r in self.history(trainer, pl_module) if MONITOR in r and r[STEP] > 0]
        if trainer.sanity_checking or not rows or rows[-1]["trainer/global_step"] == self._seen:
            return
        self._seen = rows[-1]["trainer/global_step"]
        self.rule = PatienceRule(self.patience, self.min_delta)
        stop = [self.rule.update(r["trainer/global_step"], r[MONITOR]) for r in rows][-1]
        if stop and self.stopped_at_step is None:
            self.stopped_at_step, self.stop_reason = trainer.global_step, self.rule.reason()
            trainer.should_stop = True
            print(f"[jp-peft] early stopping at step {self.stopped_at_step}: {self.stop_reason}", flush=True)

    def on_validation_end(self, trainer, pl_module):  # the hf backend validates in Lightning's loop
        self.check(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # Megatron: LanguageValidation
        self.check(trainer, pl_module)


def fired(callbacks) -> EarlyStopping | None:
    """The EarlyStopping among a trainer's callbacks that ended the stage before max_steps, if one did."""
    return next((cb for cb in callbacks if isinstance(cb, EarlyStopping) and cb.stopped_at_step is not None), None)

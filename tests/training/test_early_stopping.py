"""Early stopping on the Japanese validation loss: the rule on crafted curves, and the callback ending a stage."""

import math
from types import SimpleNamespace

import pytest

from jp_peft.training.early_stopping import EarlyStopping, PatienceRule

pytestmark = pytest.mark.unit


def _first_stop(rule, curve, every=10):
    for i, loss in enumerate(curve, start=1):
        if rule.update(i * every, loss):
            return i * every
    return None


@pytest.mark.parametrize("curve, patience, min_delta, stop_step, best_step", [
    ([3.0, 2.5, 2.4, 2.45, 2.5, 2.6, 2.0], 2, 0.0, 50, 30),     # two worse in a row after the best at 30
    ([3.0, 2.5, 2.4, 2.45, 2.3, 2.6, 2.7], 2, 0.0, 70, 50),     # an improvement resets the count
    ([3.0, 2.99, 2.98, 2.97], 2, 0.05, 30, 10),               # improvements below min_delta do not count
    ([3.0, 2.5, 2.0, 1.5], 1, 0.0, None, 40),                 # always improving: never stops
    ([3.0, float("nan")], 5, 0.0, 20, 10),                    # diverged: stops at once
])
def test_rule_stops_at_the_right_step(curve, patience, min_delta, stop_step, best_step):
    rule = PatienceRule(patience, min_delta)
    assert _first_stop(rule, curve) == stop_step
    assert rule.best_step == best_step


def _validate(callback, trainer, module, step, loss, hook="on_validation_end"):
    trainer.global_step = step
    history = module.val_history if hasattr(module, "val_history") else trainer.callbacks[0].history
    history.append({"trainer/global_step": step, "val/ja_loss": loss, "val/en_loss": 9.0})
    getattr(callback, hook)(trainer, module, *([None] * 3 if hook == "on_train_batch_end" else []))


def test_callback_ends_the_stage_and_says_why_and_survives_a_resume():
    callback = EarlyStopping(patience=2, min_delta=0.0)
    module = SimpleNamespace(val_history=[])
    trainer = SimpleNamespace(sanity_checking=False, should_stop=False, global_step=0)
    for step, loss in [(5, 3.0), (10, 2.0), (15, 2.1)]:
        _validate(callback, trainer, module, step, loss)
    assert not trainer.should_stop and callback.stopped_at_step is None
    # a resumed stage restores its validation history (hf: in the checkpoint; Megatron: from train_log.jsonl)
    # and a fresh callback keeps counting from it
    resumed = EarlyStopping(patience=2)
    _validate(resumed, trainer, module, 20, 2.05)
    assert trainer.should_stop and resumed.stopped_at_step == 20
    assert "val/ja_loss" in resumed.stop_reason and "best 2.0000 at step 10" in resumed.stop_reason
    resumed.on_validation_end(trainer, module)  # no new validation: nothing counted twice
    assert resumed.rule.bad == 2 and math.isclose(resumed.rule.best, 2.0)


def test_megatron_reads_the_language_validation_history_and_ignores_the_base_row():
    """On Megatron the rows come from LanguageValidation (listed before this callback), checked after each
    step; its step-0 row measures the base model and must not count as the stage's first validation."""
    from jp_peft.backends.megatron.language_validation import LanguageValidation

    validation = LanguageValidation.__new__(LanguageValidation)
    validation.history = [{"trainer/global_step": 0, "val/ja_loss": 0.1}]  # a base far better than anything after
    trainer = SimpleNamespace(sanity_checking=False, should_stop=False, global_step=0, callbacks=[validation])
    module = SimpleNamespace()
    callback = EarlyStopping(patience=1, min_delta=0.0)
    _validate(callback, trainer, module, 4, 3.0, hook="on_train_batch_end")
    assert not trainer.should_stop  # the first validation is the best so far, whatever the base scored
    callback.on_train_batch_end(trainer, module, None, None, None)  # the next step, no new row
    _validate(callback, trainer, module, 8, 3.0, hook="on_train_batch_end")
    assert trainer.should_stop and callback.stopped_at_step == 8 and "best 3.0000 at step 4" in callback.stop_reason

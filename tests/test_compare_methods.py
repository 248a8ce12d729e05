"""`jp-peft compare` shows each stage's method and trainable parameters, read from metrics.json."""

import pytest

from jp_peft.compare import config_differences, summary_rows
from jp_peft.records.metrics import StageMetrics

pytestmark = pytest.mark.unit


def _run(name, cpt_method, cpt_trainable):
    def metrics(stage, method, trainable):
        return StageMetrics(stage=stage, backend="hf", steps=10, base_model="b", base_val_loss_ja=2.0,
                            base_val_loss_en=1.0, val_loss_ja=1.5, val_loss_en=1.1, train_loss_first=3.0,
                            train_loss_last=2.0, tokens_per_second=100.0, consumed_tokens=1000,
                            trainable_params=trainable, total_params=2_000_000, wall_seconds=1.0,
                            precision="32-true", method=method).to_dict()
    return {"name": name, "spec": {"cpt": {"method": cpt_method}, "sft": {"method": "lora"}},
            "stages": {"cpt": {"metrics": metrics("cpt", cpt_method, cpt_trainable), "log": []},
                       "sft": {"metrics": metrics("sft", "lora", 54_272), "log": []}},
            "downstream": None}  # no eval/results.json: blank downstream cells


def test_method_and_trainable_params_columns():
    runs = [_run("a", "lora", 54_272), _run("b", "full", 1_969_088)]
    diff = config_differences(runs)
    assert diff == ["cpt.method"]
    rows = summary_rows(runs, diff)
    assert [(r["method"], r["trainable_params"]) for r in rows] == [
        ("lora+lora", "54,272+54,272"), ("full+lora", "1,969,088+54,272")]

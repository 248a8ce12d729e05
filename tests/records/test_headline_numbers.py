"""The headline numbers equal hand-computed values on known inputs (not just: a number came back).

Gain and forgetting (records/metrics.py), a validation row, compare's ja_gain_% / en_forgetting_%.
"""

from __future__ import annotations

import math

import pytest

from jp_peft.compare import summary_rows
from jp_peft.records.metrics import (downstream_forgetting, downstream_gain, forgetting_fraction, gain_fraction,
                                     relative_forgetting, relative_gain, validation_row)

pytestmark = pytest.mark.unit


def test_gain_and_forgetting_on_known_perplexities():
    # JA perplexity 40 -> 30: 10 lower, a quarter of 40. EN 20 -> 25: 5 higher, a quarter of 20.
    assert gain_fraction(40.0, 30.0) == 0.25
    assert relative_gain(40.0, 30.0) == 25.0
    assert forgetting_fraction(20.0, 25.0) == 0.25
    assert relative_forgetting(20.0, 25.0) == 25.0
    # the signs: a worse JA perplexity is a negative gain, a better EN one a negative forgetting
    assert relative_gain(30.0, 40.0) == pytest.approx(-100 / 3, rel=1e-12)
    assert relative_forgetting(25.0, 20.0) == -20.0
    assert gain_fraction(8.0, 8.0) == 0.0 == forgetting_fraction(8.0, 8.0)


def test_downstream_gain_and_forgetting_are_points_of_accuracy():
    assert downstream_gain(0.25, 0.40) == pytest.approx(0.15, abs=1e-15)
    assert downstream_forgetting(0.50, 0.45) == pytest.approx(0.05, abs=1e-15)
    assert downstream_gain(0.40, 0.25) == pytest.approx(-0.15, abs=1e-15)
    assert downstream_gain(None, 0.4) is None and downstream_forgetting(0.5, None) is None


def test_validation_row_against_the_base_losses():
    base = {"ja": math.log(40.0), "en": math.log(20.0)}
    row = validation_row(7, {"ja": math.log(30.0), "en": math.log(25.0)}, base)
    assert row["trainer/global_step"] == 7
    assert row["val/ja_loss"] == math.log(30.0) and row["val/en_loss"] == math.log(25.0)
    assert row["val/ja_ppl"] == pytest.approx(30.0, rel=1e-12) and row["val/en_ppl"] == pytest.approx(25.0, rel=1e-12)
    assert row["val/ja_ppl_gain"] == pytest.approx(0.25, rel=1e-12)
    assert row["val/en_ppl_forgetting"] == pytest.approx(0.25, rel=1e-12)
    assert set(row) == {"trainer/global_step", "val/ja_loss", "val/ja_ppl", "val/en_loss", "val/en_ppl",
                        "val/ja_ppl_gain", "val/en_ppl_forgetting"}
    # without a baseline: losses and perplexities only
    assert set(validation_row(1, {"ja": 1.0}, None)) == {"trainer/global_step", "val/ja_loss", "val/ja_ppl"}
    # with the tokens trained so far: in the row itself (W&B plots val/* against them only within one row)
    assert validation_row(3, {"ja": 1.0}, None, 6144)["perf/consumed_tokens"] == 6144


def _stage(base_ja, ja, base_en, en, tokens_per_s, wall, trainable, log=()):
    return {"metrics": {"base_val_ppl_ja": base_ja, "val_ppl_ja": ja, "base_val_ppl_en": base_en, "val_ppl_en": en,
                        "tokens_per_second": tokens_per_s, "wall_seconds": wall, "trainable_params": trainable,
                        "method": "lora"}, "log": list(log)}


def test_compare_gain_is_first_stage_base_to_last_stage_result():
    # CPT: JA 50 -> 40, SFT (starting from the CPT result): 40 -> 35; EN 20 -> 22 -> 24.
    # The run's gain is 50 -> 35 = 30 %, its forgetting 20 -> 24 = 20 %: not either stage's own.
    run = {"name": "r", "spec": {"lora": {"rank": 8}},
           "stages": {"cpt": _stage(50.0, 40.0, 20.0, 22.0, 1000.0, 10.0, 100, [{"perf/mfu": 0.25}]),
                      "sft": _stage(40.0, 35.0, 22.0, 24.0, 3000.0, 5.0, 100, [{"perf/mfu": 0.75}, {"x": 1}])},
           "downstream": None}
    (row,) = summary_rows([run], [])
    assert row["ja_ppl_base"] == 50.0 and row["ja_ppl"] == 35.0
    assert row["ja_gain_%"] == pytest.approx(30.0, rel=1e-12)
    assert row["en_ppl_base"] == 20.0 and row["en_ppl"] == 24.0
    assert row["en_forgetting_%"] == pytest.approx(20.0, rel=1e-12)
    assert row["tokens_per_s"] == 2000.0 and row["wall_s"] == 15.0
    assert row["mfu_%"] == pytest.approx(50.0, rel=1e-12)
    assert row["stages"] == "cpt+sft" and row["trainable_params"] == "100+100"

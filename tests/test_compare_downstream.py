"""`jp-peft compare` with downstream results: the JA/EN task averages, gain and forgetting per run, the
JA-vs-EN task-average plot, and blanks (no crash) for a run that has no eval/results.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from jp_peft.cli import main
from jp_peft.records.metrics import StageMetrics
from jp_peft.records.layout import write_json

pytestmark = pytest.mark.unit


def _metrics(stage: str, ja: float, en: float) -> StageMetrics:
    return StageMetrics(stage=stage, backend="hf", steps=10, base_model="/base", base_val_loss_ja=6.0,
                        base_val_loss_en=5.0, val_loss_ja=ja, val_loss_en=en, train_loss_first=6.5,
                        train_loss_last=6.0, tokens_per_second=1000.0, consumed_tokens=20480, trainable_params=10,
                        total_params=1000, wall_seconds=12.0, precision="32-true")


def _results(scores: dict[str, tuple[float, float]]) -> dict:
    def task(value):
        return {"metrics": {"acc": {"value": value, "stderr": 0.05}}, "metric": "acc", "value": value, "stderr": 0.05,
                "n": 40, "num_fewshot": 0, "lang": "ja"}

    return {"format": 1, "tasks_ja": ["jpeft_jcqa", "jpeft_marc"], "tasks_en": ["jpeft_en_mc"],
            "models": {m: {"tasks": {"jpeft_jcqa": task(ja), "jpeft_marc": task(ja + 0.1), "jpeft_en_mc": task(en)}}
                       for m, (ja, en) in scores.items()}}


def _run(root: Path, name: str, replay: float, results: dict | None) -> Path:
    run = root / name
    spec = {"name": name, "cpt": {"data": {"replay_ratio": replay}}, "lora": {"rank": 32}}
    write_json(run / "spec.json", spec)
    _metrics("cpt", 5.8, 5.1 + replay).write(run / "cpt" / "metrics.json")
    if results is not None:
        write_json(run / "eval" / "results.json", results)
    return run


def test_compare_adds_downstream_columns_and_plot_and_blanks_for_runs_without_them(tmp_path, capsys):
    replay0 = _run(tmp_path, "smoke-replay_ratio0", 0.0, _results({"base": (0.2, 0.3), "cpt": (0.3, 0.2)}))
    replay3 = _run(tmp_path, "smoke-replay_ratio0.3", 0.3, _results({"base": (0.2, 0.3), "cpt": (0.25, 0.3)}))
    plain = _run(tmp_path, "no-eval", 0.1, None)
    out = tmp_path / "compare"
    assert main(["compare", str(replay0), str(replay3), str(plain), "--output", str(out)]) == 0
    rows = {r["run"]: r for r in json.loads((out / "compare.json").read_text())}
    r0, r3 = rows["smoke-replay_ratio0"], rows["smoke-replay_ratio0.3"]
    assert r0["cpt.data.replay_ratio"] == 0.0 and r3["cpt.data.replay_ratio"] == 0.3
    # JA: mean of 30 and 40 points; EN: one task; gain/forgetting against the run's base (20/30 -> 25, 30)
    assert r0["ja_avg"] == pytest.approx(35.0) and r0["en_avg"] == pytest.approx(20.0)
    assert r0["ja_gain_pt"] == pytest.approx(10.0) and r0["en_forgetting_pt"] == pytest.approx(10.0)
    assert r3["ja_gain_pt"] == pytest.approx(5.0) and r3["en_forgetting_pt"] == pytest.approx(0.0)
    assert all(rows["no-eval"][k] is None for k in ("ja_avg", "en_avg", "ja_gain_pt", "en_forgetting_pt"))

    runs_table = (out / "compare.md").read_text().split("## Stages")[0]  # the first table: a row per run
    lines = [line for line in runs_table.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[-4:] == ["ja_avg", "en_avg", "ja_gain_pt", "en_forgetting_pt"]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    assert cells["smoke-replay_ratio0"][-4:] == ["35", "20", "10", "10"]
    assert cells["no-eval"][-4:] == ["", "", "", ""]  # blank, not n/a, not a crash
    for name in ("gain_forgetting_tasks.png", "task_averages.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        assert f"src='{name}'" in (out / "compare.html").read_text()
    assert all(math.isfinite(r["ja_ppl"]) for r in rows.values())


def test_compare_without_any_downstream_results_still_writes_every_output(tmp_path, capsys):
    run = _run(tmp_path, "old-run", 0.1, None)
    out = tmp_path / "compare"
    assert main(["compare", str(run), "--output", str(out)]) == 0
    assert (out / "gain_forgetting_tasks.png").exists() and "5 plots" in capsys.readouterr().out


def test_compare_names_a_corrupt_results_file(tmp_path, capsys):
    run = _run(tmp_path, "bad", 0.1, {"format": 1, "models": {}})
    assert main(["compare", str(run), "--output", str(tmp_path / "o")]) == 2
    assert "eval/results.json: not an eval stage results file" in capsys.readouterr().err

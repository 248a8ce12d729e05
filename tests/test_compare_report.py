"""`jp-peft compare` as a research report: validation curves per run and stage against consumed tokens,
gain/forgetting from zero with lm-eval's stderr as error bars, a row per stage against base and against the
stage before, captions, a warning for a run directory named twice, the default output in --help."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from jp_peft.cli import main
from jp_peft.evaluation.summary import mean_stderr
from jp_peft.records.layout import write_json
from jp_peft.records.metrics import StageMetrics

pytestmark = pytest.mark.unit

# (ja loss, en loss) at steps 0 (the stage's start), 5 and 10; 2,048 tokens per step
CURVES = {"cpt": [(6.0, 5.0), (5.8, 5.1), (5.7, 5.2)], "sft": [(5.7, 5.2), (5.75, 5.15), (5.72, 5.18)]}


def _stage(run: Path, stage: str, curve) -> None:
    history = [{"trainer/global_step": step, "val/ja_loss": ja, "val/en_loss": en}
               for step, (ja, en) in zip((5, 10), curve[1:])]
    StageMetrics(stage=stage, backend="hf", steps=10, base_model="/base", base_val_loss_ja=curve[0][0],
                 base_val_loss_en=curve[0][1], val_loss_ja=curve[-1][0], val_loss_en=curve[-1][1],
                 train_loss_first=6.5, train_loss_last=6.0, tokens_per_second=1000.0, consumed_tokens=20480,
                 trainable_params=10, total_params=1000, wall_seconds=12.0, precision="32-true",
                 val_history=history).write(run / stage / "metrics.json")
    rows = [{"trainer/global_step": s, "train/loss": 6.0 - 0.01 * s, "perf/consumed_tokens": 2048 * s}
            for s in range(1, 11)]
    (run / stage / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _results(avgs: dict[str, tuple[float, float]], stderr: float = 0.05) -> dict:
    def task(value):
        return {"metrics": {"acc": {"value": value, "stderr": stderr}}, "value": value, "stderr": stderr, "n": 100}

    return {"format": 1, "tasks_ja": ["ja1", "ja2"], "tasks_en": ["en1"],
            "models": {m: {"tasks": {"ja1": task(ja - 0.02), "ja2": task(ja + 0.02), "en1": task(en)}}
                       for m, (ja, en) in avgs.items()}}


@pytest.fixture
def run(tmp_path) -> Path:
    run = tmp_path / "smoke-a"
    write_json(run / "spec.json", {"name": "smoke-a", "lora": {"rank": 32}})
    for stage, curve in CURVES.items():
        _stage(run, stage, curve)
    write_json(run / "eval" / "results.json", _results({"base": (0.30, 0.40), "cpt": (0.36, 0.37),
                                                        "sft": (0.35, 0.38)}))
    return run


def test_validation_curves_per_stage_against_consumed_tokens(run, tmp_path):
    out = tmp_path / "report"
    assert main(["compare", str(run), "--output", str(out)]) == 0
    figures = json.loads((out / "figures.json").read_text())
    curves = {(s["panel"], s["label"]): s for s in figures["val_loss_vs_tokens.png"]}
    assert set(curves) == {(lang, f"smoke-a {stage}") for lang in ("ja", "en") for stage in ("cpt", "sft")}
    # cpt from 0 tokens (the base) through its validations; sft continues at cpt's last token count
    assert curves["ja", "smoke-a cpt"]["x"] == [0.0, 10240.0, 20480.0]
    assert curves["ja", "smoke-a sft"]["x"] == [20480.0, 30720.0, 40960.0]
    for stage, curve in CURVES.items():
        assert curves["ja", f"smoke-a {stage}"]["y"] == [ja for ja, _ in curve]
        assert curves["en", f"smoke-a {stage}"]["y"] == [en for _, en in curve]
    # train loss: a panel per stage, never one axis for both
    assert {s["panel"] for s in figures["loss_vs_tokens.png"]} == {"cpt", "sft"}
    png = (out / "val_loss_vs_tokens.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000


def test_gain_and_forgetting_with_stderr_error_bars_and_a_row_per_stage(run, tmp_path):
    out = tmp_path / "report"
    assert main(["compare", str(run), "--output", str(out)]) == 0
    stages = {r["stage"]: r for r in json.loads((out / "compare_stages.json").read_text())}
    assert list(stages) == ["base", "cpt", "sft"]
    cpt, sft = stages["cpt"], stages["sft"]
    # perplexity: against base and against the stage before (sft starts from cpt's 5.7/5.2)
    assert cpt["ja_gain_%"] == pytest.approx(100 * (1 - math.exp(5.7 - 6.0)))
    assert sft["ja_gain_%"] == pytest.approx(100 * (1 - math.exp(5.72 - 6.0)))
    assert sft["ja_gain_%_vs_prev"] == pytest.approx(100 * (1 - math.exp(5.72 - 5.7)))
    assert sft["en_forgetting_%_vs_prev"] == pytest.approx(100 * (math.exp(5.18 - 5.2) - 1))
    assert stages["base"]["ja_gain_%"] == 0 and stages["base"]["ja_gain_%_vs_prev"] is None
    assert stages["base"]["ja_gain_pt_stderr"] is None  # base against itself has no difference to be uncertain of
    # task points: JA 30 -> 36 -> 35, EN 40 -> 37 -> 38
    assert (cpt["ja_gain_pt"], cpt["en_forgetting_pt"]) == pytest.approx((6.0, 3.0))
    assert (sft["ja_gain_pt_vs_prev"], sft["en_forgetting_pt_vs_prev"]) == pytest.approx((-1.0, -1.0))
    # stderr of a two-task average: sqrt(5^2 + 5^2) / 2 points; of a difference from base: sqrt(2) x that
    assert cpt["ja_avg_stderr"] == pytest.approx(math.sqrt(50) / 2)
    assert cpt["ja_gain_pt_stderr"] == pytest.approx(math.sqrt(2) * math.sqrt(50) / 2)
    assert cpt["en_forgetting_pt_stderr"] == pytest.approx(math.sqrt(2) * 5)
    figures = json.loads((out / "figures.json").read_text())
    points = {s["label"]: s for s in figures["gain_forgetting_tasks.png"]}
    assert points["smoke-a cpt"]["x"] == pytest.approx([6.0]) and points["smoke-a cpt"]["y"] == pytest.approx([3.0])
    assert points["smoke-a cpt"]["xerr"] == pytest.approx([cpt["ja_gain_pt_stderr"]])
    assert points["smoke-a cpt"]["yerr"] == pytest.approx([cpt["en_forgetting_pt_stderr"]])
    assert points["smoke-a base"]["x"] == [0.0] and points["smoke-a base"]["y"] == [0.0]
    bars = {(s["panel"], s["label"]): s for s in figures["task_averages.png"]}
    assert bars["ja", "cpt"]["y"] == pytest.approx([36.0]) and bars["ja", "cpt"]["yerr"] == pytest.approx([math.sqrt(50) / 2])
    ppl = {s["label"]: s for s in figures["gain_forgetting_ppl.png"]}
    assert ppl["smoke-a cpt"]["x"] == pytest.approx([cpt["ja_gain_%"]])
    page = (out / "compare.html").read_text()
    for name in figures:
        assert f"<img src='{name}'" in page and f"<figcaption><b>{name}</b>" in page
    assert "<h2>Stages" in page and "## Stages" in (out / "compare.md").read_text()


def test_a_run_directory_named_twice_is_compared_once_with_a_warning(run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["compare", str(run), str(run) + "/", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {run}/: the same run directory as {run}; compared once" in err
    assert [r["run"] for r in json.loads((out / "compare.json").read_text())] == ["smoke-a"]
    assert "the same run directory" in (out / "compare.html").read_text()


def test_help_names_the_default_output(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "default: runs/compare" in " ".join(capsys.readouterr().out.split())


def test_mean_stderr():
    assert mean_stderr([0.03, 0.04]) == pytest.approx(0.025)
    assert mean_stderr([0.03, None]) is None and mean_stderr([]) is None


def test_two_runs_of_one_name_are_told_apart_by_their_parent(run, tmp_path):
    import shutil

    other = tmp_path / "b" / "smoke-a"
    shutil.copytree(run, other)
    out = tmp_path / "report"
    assert main(["compare", str(run), str(other), "--output", str(out)]) == 0
    names = [r["run"] for r in json.loads((out / "compare.json").read_text())]
    assert names == [f"{run.parent.name}/smoke-a", "b/smoke-a"]
    labels = {s["label"] for s in json.loads((out / "figures.json").read_text())["val_loss_vs_tokens.png"]}
    assert len(labels) == 4  # 2 runs x cpt, sft: no run's curve hidden under the other's name

"""The experiment's eval section before anything runs (tasks known, data present, said per field), and the
downstream summary's numbers (averages, gain, forgetting) from a results record. No model involved."""

from __future__ import annotations

from pathlib import Path

import pytest

from jp_peft.evaluation.suite import check_suite, suite_problems
from jp_peft.evaluation.summary import downstream_summary, format_downstream, primary_metric
from jp_peft.spec import resolve_spec
from jp_peft.spec import SpecError, load_preset

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def _spec(tmp_path, *overrides):
    return resolve_spec(load_preset("smoke"), [f"output_dir={tmp_path}", *overrides])


def test_bundled_suite_of_the_smoke_preset_is_ready(tmp_path):
    assert suite_problems(_spec(tmp_path)) == []


def test_hub_tasks_without_data_are_one_line_naming_the_fetch_command(tmp_path):
    problems = suite_problems(_spec(tmp_path, "eval.tasks_en=[jpeft_en_mc,hellaswag,arc_easy]"))
    assert problems == ["eval.tasks_en: hellaswag, arc_easy read Hub data sets, never downloaded at run time, and "
                        "eval.data_dir is not set: run `jp-peft eval fetch-data DATA_DIR --tasks hellaswag,arc_easy` "
                        "on a machine with network, then pass eval.data_dir=DATA_DIR"]
    data = tmp_path / "lm_eval_data"
    (data / "hellaswag").mkdir(parents=True)
    (data / "hellaswag" / "validation.jsonl").write_text("{}\n")
    problems = suite_problems(_spec(tmp_path, "eval.tasks_en=[hellaswag,arc_easy]", f"eval.data_dir={data}"))
    assert problems == [f"eval.tasks_en: eval.data_dir={data} lacks the files of arc_easy: run "
                        f"`jp-peft eval fetch-data {data} --tasks arc_easy` on a machine with network "
                        "(`jp-peft eval --data-dir` names each file)"]
    with pytest.raises(SpecError, match="eval.tasks_en: eval.data_dir=.* lacks the files of arc_easy"):
        check_suite(_spec(tmp_path, "eval.tasks_en=[hellaswag,arc_easy]", f"eval.data_dir={data}"))


def test_the_production_preset_without_eval_data_is_refused_in_one_line(tmp_path):
    """The README's real-model launch on a fresh machine: one line, the fetch command with no --tasks (its
    default is this preset's tasks), both fields named."""
    exp = resolve_spec(load_preset("qwen25_500m_ja"), [f"output_dir={tmp_path}"])
    (line,) = suite_problems(exp)
    assert line.startswith("eval.tasks_ja, eval.tasks_en: ja_leaderboard_jcommonsenseqa, ")
    assert "`jp-peft eval fetch-data DATA_DIR` on a machine with network, then pass eval.data_dir=DATA_DIR" in line


@pytest.mark.parametrize("overrides, line", [
    (["eval.tasks_ja=[jpeft_jcqa,jcqa_typo]"], "eval.tasks_ja: unknown task 'jcqa_typo'"),
    (["eval.tasks_en=[jpeft_jcqa]"], "eval.tasks_en: jpeft_jcqa also in eval.tasks_ja"),
    (["eval.data_dir=/nonexistent/lm-eval"], "eval.data_dir: /nonexistent/lm-eval is not a directory"),
    (["eval.include_path=[/nonexistent/yamls]"], "eval.include_path: /nonexistent/yamls is not a directory"),
])
def test_suite_mistakes_name_the_field(tmp_path, overrides, line):
    problems = suite_problems(_spec(tmp_path, *overrides))
    assert len(problems) == 1 and problems[0].startswith(line), problems


def test_nothing_to_check_without_the_eval_stage_or_tasks(tmp_path):
    assert suite_problems(_spec(tmp_path, "eval.tasks_en=[hellaswag]", "stages=[import,data,cpt]")) == []
    assert suite_problems(_spec(tmp_path, "eval.tasks_ja=[]", "eval.tasks_en=[]")) == []


def _task(acc: float, **extra) -> dict:
    metrics = {"acc": {"value": acc, "stderr": 0.05}, "acc_norm": {"value": 1 - acc, "stderr": 0.05}}
    return {"metrics": metrics, "n": 40, "num_fewshot": 0, "value": acc, "metric": "acc", **extra}


def _results(scores: dict[str, dict[str, float]]) -> dict:
    return {"tasks_ja": ["jpeft_jcqa", "jpeft_jnli", "jpeft_marc"], "tasks_en": ["jpeft_en_mc"],
            "models": {model: {"tasks": {t: _task(v) for t, v in tasks.items()}} for model, tasks in scores.items()}}


def test_averages_gain_and_forgetting_in_points_against_base():
    results = _results({
        "base": {"jpeft_jcqa": 0.200, "jpeft_jnli": 0.325, "jpeft_marc": 0.500, "jpeft_en_mc": 0.300},
        "cpt": {"jpeft_jcqa": 0.275, "jpeft_jnli": 0.350, "jpeft_marc": 0.575, "jpeft_en_mc": 0.250},
        "sft": {"jpeft_jcqa": 0.250, "jpeft_jnli": 0.400, "jpeft_marc": 0.550, "jpeft_en_mc": 0.325},
    })
    summary = downstream_summary(results)
    base, cpt, sft = (summary["models"][m] for m in ("base", "cpt", "sft"))
    assert base["ja_avg"] == pytest.approx((20.0 + 32.5 + 50.0) / 3) and base["en_avg"] == pytest.approx(30.0)
    assert cpt["ja_avg"] == pytest.approx((27.5 + 35.0 + 57.5) / 3)
    assert cpt["ja_gain"] == pytest.approx(cpt["ja_avg"] - base["ja_avg"]) == pytest.approx(5.8333333)
    assert cpt["en_forgetting"] == pytest.approx(5.0)  # 30 -> 25: five points forgotten
    assert sft["en_forgetting"] == pytest.approx(-2.5)  # above base: negative forgetting
    assert base["ja_gain"] is None and base["en_forgetting"] is None
    assert cpt["scores"]["jpeft_marc"] == pytest.approx(57.5)
    table = format_downstream(summary)
    lines = table.strip().splitlines()
    assert "jpeft_jcqa (JA)" in lines[0] and "jpeft_en_mc (EN)" in lines[0]
    assert lines[1].split()[-8:] == ["JA", "avg", "EN", "avg", "JA", "gain", "EN", "forget"]
    assert lines[3].split() == ["cpt", "27.5", "35.0", "57.5", "25.0", "40.0", "25.0", "+5.8", "+5.0"]
    assert lines[2].split() == ["base", "20.0", "32.5", "50.0", "30.0", "34.2", "30.0"]  # no gain against itself


def test_an_empty_language_has_no_average_and_no_gain():
    results = _results({"base": {"jpeft_en_mc": 0.3}, "cpt": {"jpeft_en_mc": 0.2}})
    results["tasks_ja"] = []
    summary = downstream_summary(results)
    assert summary["models"]["cpt"]["ja_avg"] is None and summary["models"]["cpt"]["ja_gain"] is None
    assert summary["models"]["cpt"]["en_forgetting"] == pytest.approx(10.0)


def test_primary_metric_is_accuracy_else_the_first_higher_is_better_one():
    assert primary_metric(_task(0.5)) == "acc"
    generation = {"metrics": {"exact_match,get-answer": {"value": 0.1, "stderr": None},
                              "char_f1": {"value": 0.4, "stderr": None}},
                  "higher_is_better": {"exact_match": True, "char_f1": True}}
    assert primary_metric(generation) == "exact_match,get-answer"
    lower = {"metrics": {"perplexity": {"value": 9.0, "stderr": None}, "f1": {"value": 0.5, "stderr": None}},
             "higher_is_better": {"perplexity": False, "f1": True}}
    assert primary_metric(lower) == "f1"

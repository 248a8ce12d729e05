"""The experiment's eval stage on the smoke run (tests/conftest.py: the real CLI, the tiny Qwen2): base,
cpt and sft scored on the preset's bundled tasks, results.json, the summary's averages, gain and
forgetting computed from it, the printed table and the greedy samples."""

from __future__ import annotations

import json
from statistics import fmean

import pytest

pytestmark = pytest.mark.integration
# The smoke preset's tasks: the JGLUE-style sets and the continuation sets (recipes/configs/smoke.yaml).
JA = ["jpeft_jcqa", "jpeft_jnli", "jpeft_marc", "jpeft_ja_cont"]
EN = ["jpeft_en_mc", "jpeft_en_cont"]


def _read(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_results_hold_every_model_and_task_with_provenance(smoke_run):
    import lm_eval

    run_dir = smoke_run[0]
    results = _read(run_dir / "eval" / "results.json")
    limit = _read(run_dir / "spec.json")["eval"]["limit"]  # the smoke fixture's eval.limit
    assert (results["tasks_ja"], results["tasks_en"]) == (JA, EN)
    assert list(results["models"]) == ["base", "cpt", "sft"]
    base_dir = _read(run_dir.parent / "smoke" / "import" / "base.json")["base_dir"]
    assert results["models"]["base"]["model"] == str(__import__("pathlib").Path(base_dir).resolve())
    for stage in ("cpt", "sft"):
        record = results["models"][stage]
        assert record["model"] == str((run_dir / stage / "hf_merged").resolve())
        assert record["adapter"] == str(run_dir / stage / "hf_adapter")  # the other form, recorded
    hashes = {}
    for name, record in results["models"].items():
        assert record["lm_eval_version"] == lm_eval.__version__ and record["limit"] == limit
        for task in JA + EN:
            entry = record["tasks"][task]
            assert entry["lang"] == ("ja" if task in JA else "en")
            assert entry["metric"] == "acc" and entry["value"] == entry["metrics"]["acc"]["value"]
            assert entry["stderr"] == entry["metrics"]["acc"]["stderr"] > 0
            assert (entry["n"], entry["num_fewshot"]) == (limit, 0)
            assert entry["value"] * limit == pytest.approx(round(entry["value"] * limit))  # a share of the items
            hashes.setdefault(task, set()).add(entry["config_sha256"])
    assert all(len(h) == 1 for h in hashes.values())  # the same task config and data for every model


def test_summary_averages_gain_and_forgetting_follow_from_the_task_scores(smoke_run):
    run_dir, stdout, _ = smoke_run
    results = _read(run_dir / "eval" / "results.json")
    summary = _read(run_dir / "summary.json")
    points = {m: {t: 100 * r["tasks"][t]["value"] for t in JA + EN} for m, r in results["models"].items()}
    averages = {m: (fmean(p[t] for t in JA), fmean(p[t] for t in EN)) for m, p in points.items()}
    downstream = summary["downstream"]
    for model, (ja, en) in averages.items():
        assert downstream["models"][model]["ja_avg"] == pytest.approx(ja)
        assert downstream["models"][model]["en_avg"] == pytest.approx(en)
        assert downstream["models"][model]["scores"] == pytest.approx(points[model])
    base_ja, base_en = averages["base"]
    for row in summary["stages"]:
        ja, en = averages[row["stage"]]
        assert (row["ja_avg"], row["en_avg"]) == pytest.approx((ja, en))
        assert row["ja_gain"] == pytest.approx(ja - base_ja)
        assert row["en_forgetting"] == pytest.approx(base_en - en)
    # the printed table: the perplexity columns, then the task averages; the per-task table
    assert "JA avg" in stdout and "EN forget" in stdout and "jpeft_jcqa (JA)" in stdout
    cpt_line = next(line for line in stdout.splitlines() if line.startswith("cpt ") and "%" in line)
    assert cpt_line.split()[-4:] == [f"{averages['cpt'][0]:.1f}", f"{averages['cpt'][0] - base_ja:+.1f}",
                                     f"{averages['cpt'][1]:.1f}", f"{base_en - averages['cpt'][1]:+.1f}"]


def test_greedy_samples_of_every_model(smoke_run):
    from jp_peft.evaluation.generation import load_prompts

    run_dir = smoke_run[0]
    rows = [json.loads(line) for line in (run_dir / "eval" / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    prompts = load_prompts()
    assert [r["id"] for r in rows] == [p["id"] for p in prompts] and len(rows) == 20
    for row, prompt in zip(rows, prompts):
        assert set(row) == {"id", "prompt", "base", "cpt", "sft"} and row["prompt"] == prompt["prompt"]
        assert all(isinstance(row[m], str) for m in ("base", "cpt", "sft"))

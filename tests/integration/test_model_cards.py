"""The smoke run's model cards and deployability records (the shared `smoke_run`, no run of its own): every
hf_adapter/ and hf_merged/ has a README.md that huggingface_hub's parser reads, whose front matter and
model-index equal the run's own records (adapter_config.json, metrics.json, spec.json, eval/results.json), and
export.json's deployability carries the export checks' numbers; `jp-peft status` shows it."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

from jp_peft.records.metrics import relative_forgetting, relative_gain

pytestmark = pytest.mark.integration
STAGES = ("cpt", "sft")


def _json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _sources(spec: dict, stage: str) -> list[str]:
    data = spec[stage]["data"]
    if stage == "cpt":
        return [s for entry in data["blend"] for s in entry["source"]]
    return list(data["sft_source"])


@pytest.mark.parametrize("stage", STAGES)
def test_every_exported_artifact_has_a_card_that_parses_and_equals_the_runs_records(smoke_run, stage):
    run_dir = smoke_run[0]
    spec, metrics = _json(run_dir / "spec.json"), _json(run_dir / stage / "metrics.json")
    record = _json(run_dir / stage / "export.json")
    scores = _json(run_dir / "eval" / "results.json")["models"][stage]["tasks"]
    adapter_base = _json(run_dir / stage / "hf_adapter" / "adapter_config.json")["base_model_name_or_path"]
    assert adapter_base == record["adapter_base"] == metrics["base_model"]
    datasets = {"hf_adapter": _sources(spec, stage),  # the merged sft model also learned cpt's data
                "hf_merged": [*(_sources(spec, "cpt") if stage == "sft" else []), *_sources(spec, stage)]}
    for artifact, library in (("hf_adapter", "peft"), ("hf_merged", "transformers")):
        card = ModelCard.load(run_dir / stage / artifact / "README.md")
        data = card.data
        assert data.base_model == adapter_base, artifact
        assert (data.library_name, data.language, data.license) == (library, ["ja", "en"], "apache-2.0"), artifact
        assert data.datasets == datasets[artifact] and data.datasets, artifact
        assert {"jp-peft", stage, metrics["method"], "tiny-test-model"} <= set(data.tags)
        # model-index: the eval stage rewrote the card with this run's scores, one per task
        assert data.eval_results, f"{artifact}: no model-index: the eval stage did not rewrite the card"
        got = sorted((r.dataset_type, r.metric_type, r.metric_value) for r in data.eval_results)
        assert got == sorted((task, e["metric"], e["value"]) for task, e in scores.items()), artifact
        text = card.text
        gain = relative_gain(metrics["base_val_ppl_ja"], metrics["val_ppl_ja"])
        forgetting = relative_forgetting(metrics["base_val_ppl_en"], metrics["val_ppl_en"])
        assert f"JA gain {gain:+.2f}%" in text and f"EN forgetting {forgetting:+.2f}%" in text
        assert f"{metrics['steps']} of {spec[stage]['train']['max_steps']}" in text
        assert f"{metrics['consumed_tokens']:,}" in text
        assert f"hf upload REPO_ID {run_dir / stage / artifact}" in text
        assert "not a language model anyone should use" in text


@pytest.mark.parametrize("stage", STAGES)
def test_the_export_record_says_where_each_artifact_runs_with_the_export_checks_numbers(smoke_run, stage):
    run_dir = smoke_run[0]
    record, spec = _json(run_dir / stage / "export.json"), _json(run_dir / "spec.json")
    checks = {c["check"]: c for c in record["checks"]}
    deploy = record["deployability"]
    assert set(deploy) == {"hf_adapter", "hf_merged"}  # no .nemo on the hf backend
    by_target = {artifact: {e["target"]: e for e in entries} for artifact, entries in deploy.items()}
    peft = by_target["hf_adapter"]["transformers+peft"]
    assert peft["status"] == "verified"
    assert [c["max_abs_diff"] for c in peft["checks"]] == [checks["peft_adapter_vs_hf_merged"]["max_abs_diff"]]
    merged = by_target["hf_merged"]["transformers"]
    assert [c["max_abs_diff"] for c in merged["checks"]] == [checks["hf_merged_vs_trained"]["max_abs_diff"]]
    vllm = by_target["hf_adapter"]["vllm"]
    rank = spec["lora"]["rank"]
    assert vllm["status"] == "not verified here" and vllm["rank"] == rank and vllm["max_lora_rank"] >= rank
    assert f"--max-lora-rank {vllm['max_lora_rank']}" in vllm["command"]
    assert vllm["command"] in ModelCard.load(run_dir / stage / "hf_adapter" / "README.md").text
    for entries in by_target.values():
        for target in ("vllm", "llama.cpp"):
            assert entries[target]["status"] == "not verified here"


def test_status_shows_each_artifacts_deployability_in_one_line(smoke_run):
    from jp_peft.run.status import status_lines

    lines = status_lines(smoke_run[0])
    for stage in STAGES:
        at = next(i for i, line in enumerate(lines) if line.split()[0].endswith(f"-export-{stage}"))
        assert lines[at + 1].split()[0] == "hf_adapter" and lines[at + 2].split()[0] == "hf_merged", lines
        assert "transformers+peft verified (max |logit diff|" in lines[at + 1]
        assert "vllm not verified here (needs --max-lora-rank" in lines[at + 1]

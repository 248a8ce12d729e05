"""Model cards from a run's records, parsed back by huggingface_hub's own model-card parser: the front matter
(base_model, library_name, language, license, tags, datasets, model-index) and the markdown (training summary,
loading, deployment, limitations, upload). The real run's cards: tests/integration/test_model_cards.py."""

from __future__ import annotations

import math

import pytest
from huggingface_hub import ModelCard

from jp_peft.export import deployability as deploy
from jp_peft.export.model_card import base_license, card_datasets, write_cards
from jp_peft.records import layout
from jp_peft.records.export_record import ExportRecord
from jp_peft.records.metrics import StageMetrics, relative_forgetting, relative_gain
from jp_peft.spec import load_preset, resolve_spec

pytestmark = pytest.mark.unit

CHECKS = [{"check": "hf_merged_vs_trained", "max_abs_diff": 2.4e-6, "argmax_agreement": 1.0, "atol": 1e-4, "ok": True,
           "positions": 512},
          {"check": "peft_adapter_vs_hf_merged", "max_abs_diff": 3.1e-6, "argmax_agreement": 1.0, "atol": 1e-4,
           "ok": True, "positions": 512}]
RESULTS = {"tasks_ja": ["jpeft_jcqa"], "tasks_en": ["jpeft_en_mc"], "eval": {"limit": 12}, "models": {
    name: {"tasks": {"jpeft_jcqa": {"metric": "acc", "value": ja, "n": 12, "n_total": 125, "num_fewshot": 0},
                     "jpeft_en_mc": {"metric": "acc", "value": en, "n": 12, "n_total": 120, "num_fewshot": 0}}}
    for name, ja, en in (("base", 0.25, 0.5), ("cpt", 0.5, 0.4166))}}


def _metrics(stage: str, base: str, method: str) -> StageMetrics:
    return StageMetrics(stage=stage, backend="hf", steps=16, base_model=base, base_val_loss_ja=6.7, base_val_loss_en=5.7,
                        val_loss_ja=6.6, val_loss_en=5.75, train_loss_first=6.6, train_loss_last=6.4,
                        tokens_per_second=300.0, consumed_tokens=32768, trainable_params=434176,
                        total_params=2403264, wall_seconds=10.0, precision="32-true", method=method)


def _run(tmp_path, method="lora"):
    """A run directory with cpt's records and empty artifact directories (cards need no weights)."""
    spec = resolve_spec(load_preset("smoke"), [f"output_dir={tmp_path}", f"cpt.method={method}"])
    _metrics("cpt", "/base", method).write(layout.metrics_file(spec, "cpt"))
    entry = spec.cpt.data.blend[0]
    layout.write_json(layout.data_record(spec), {entry.prefix: {"tokens": 404453, "kept": 2036}})
    for d in (layout.hf_adapter(spec, "cpt"), layout.hf_merged(spec, "cpt")):
        d.mkdir(parents=True)
    record = ExportRecord(method=method, hf_merged=str(layout.hf_merged(spec, "cpt")),
                          hf_adapter=str(layout.hf_adapter(spec, "cpt")), adapter_base="/base", checks=CHECKS)
    modules = ["embed_tokens", "lm_head"] if method == "lora_embed" else None
    record = ExportRecord(**{**record.to_dict(), "deployability": deploy.deployability(
        record, deploy.served_name(spec, "cpt"), {"r": spec.lora.rank, "modules_to_save": modules})})
    return spec, record


def test_both_cards_parse_and_their_front_matter_is_the_runs_records(tmp_path):
    spec, record = _run(tmp_path)
    written = write_cards(spec, "cpt", record, RESULTS)
    assert written == [layout.hf_adapter(spec, "cpt") / "README.md", layout.hf_merged(spec, "cpt") / "README.md"]
    sources = [s for e in spec.cpt.data.blend for s in e.source]
    for path, library in zip(written, ("peft", "transformers")):
        card = ModelCard.load(path)
        data = card.data
        assert (data.base_model, data.library_name, data.language) == ("/base", library, ["ja", "en"])
        assert data.license == base_license(spec)[0] == "apache-2.0"
        assert data.datasets == sources and len(sources) == 2
        assert {"jp-peft", "cpt", "lora", "tiny-test-model"} <= set(data.tags)
        scores = {(r.dataset_type, r.metric_type): r.metric_value for r in data.eval_results}
        assert scores == {("jpeft_jcqa", "acc"): 0.5, ("jpeft_en_mc", "acc"): 0.4166}
        assert data.model_name == f"{spec.name}-cpt-{path.parent.name}"
        text = card.text
        assert "r=32, alpha=16" in text and f"16 of {spec.cpt.train.max_steps}" in text and "32,768" in text and "404,453" in text
        assert f"JA gain {relative_gain(math.exp(6.7), math.exp(6.6)):+.2f}%" in text
        assert f"EN forgetting {relative_forgetting(math.exp(5.7), math.exp(5.75)):+.2f}%" in text
        assert "50.0 (JA gain +25.0)" in text  # points: 50.0 - 25.0
        assert "It is not a language model anyone should use" in text
        assert f"hf upload REPO_ID {path.parent}" in text
    adapter = ModelCard.load(written[0]).text
    assert "PeftModel.from_pretrained" in adapter
    assert (f"vllm serve /base --enable-lora --lora-modules {spec.name}-cpt={layout.hf_adapter(spec, 'cpt')} "
            "--max-lora-rank 32") in adapter
    assert "AutoModelForCausalLM.from_pretrained" in ModelCard.load(written[1]).text


def test_the_merged_sft_model_names_cpts_data_too_and_its_adapter_only_its_own(tmp_path):
    spec, _ = _run(tmp_path)
    cpt = [s for e in spec.cpt.data.blend for s in e.source]
    assert card_datasets(spec, "sft", "hf_adapter") == list(spec.sft.data.sft_source) != []
    assert card_datasets(spec, "sft", "hf_merged") == [*cpt, *spec.sft.data.sft_source]
    assert card_datasets(spec, "cpt", "hf_merged") == cpt


def test_without_scores_a_card_has_no_model_index(tmp_path):
    spec, record = _run(tmp_path)
    for path in write_cards(spec, "cpt", record):
        card = ModelCard.load(path)
        assert card.data.eval_results is None and "model-index" not in card.content
        assert "No downstream scores yet" in card.text


def test_a_lora_embed_adapters_card_says_vllm_and_llama_cpp_refuse_it_and_points_to_hf_merged(tmp_path):
    spec, record = _run(tmp_path, "lora_embed")
    adapter, merged = write_cards(spec, "cpt", record)
    text = ModelCard.load(adapter).text
    assert deploy.VLLM_REFUSES_MODULES_TO_SAVE in text and deploy.LLAMA_CPP_REFUSES_EMBEDDINGS in text
    assert f"vllm serve {record.hf_merged}" in text and "--enable-lora" not in text
    assert "lora_embed" in ModelCard.load(merged).data.tags


def test_a_real_base_takes_the_license_of_its_own_card_else_qwen25s(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    spec = resolve_spec(load_preset("smoke"), [f"output_dir={tmp_path}", "model.tiny=false", f"model.name={base}"])
    layout.write_json(layout.import_record(spec), {"base_dir": str(base)})
    from jp_peft.models.shapes import QWEN25_05B_HF_CONFIG

    layout.write_json(base / "config.json", QWEN25_05B_HF_CONFIG)
    assert base_license(spec)[0] == "apache-2.0" and "no card" in base_license(spec)[1]
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a base\n")
    assert base_license(spec) == ("mit", f"read from the base model's card ({base / 'README.md'})")
    (base / "README.md").unlink()
    layout.write_json(base / "config.json", {**QWEN25_05B_HF_CONFIG, "hidden_size": 64})
    assert base_license(spec)[0] == "other"

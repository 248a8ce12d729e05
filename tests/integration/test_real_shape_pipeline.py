"""The real-shape CPU tier: Qwen2.5-0.5B's architecture with random weights and the real tokenizer
(jp_peft.models.real_shape) through import -> data -> cpt -> export -> sft -> export -> eval on each backend,
with bench/real_shape_cpu.py's short settings (2 steps a stage here). One run per backend, shared by its
tests (module scope); the facts checked are the tied embedding at this shape (what hf_merged stores, its
parameters, what PEFT reloads) and the parity of every export at the 152k vocabulary."""

from __future__ import annotations

import pytest

from bench import real_shape_cpu as bench
from jp_peft.models.shapes import QWEN25_05B_HF_CONFIG, QWEN25_05B_PARAMETERS

STEPS = 2
# The embedding matrix, which an untied lm_head stores a second time
EMBEDDING = QWEN25_05B_HF_CONFIG["vocab_size"] * QWEN25_05B_HF_CONFIG["hidden_size"]
# PEFT's unmerged adapter against the merged weights, fp32: the sum is reassociated, nothing else
RELOAD_ATOL = 1e-3


def _run(backend: str, tmp_path_factory) -> dict:
    from jp_peft.models.real_shape import ensure_real_shape_base

    work = tmp_path_factory.mktemp(f"real_shape_{backend}")
    return bench.measure_backend(backend, ensure_real_shape_base(log=lambda m: None), work, STEPS,
                                 bench.bench_env(work))


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    return _run("hf", tmp_path_factory)


@pytest.fixture(scope="module")
def megatron_run(tmp_path_factory):
    return _run("megatron", tmp_path_factory)


def _exports_pass(record: dict) -> None:
    for stage in bench.TRAINED:
        checks = record["stages"][stage]["parity"]
        assert checks, f"{stage}: export.json has no checks"
        for check in checks:
            assert check["ok"] and check["max_abs_diff"] <= check["atol"], (stage, check)


@pytest.mark.slow
@pytest.mark.integration
def test_hf_backend_keeps_the_embedding_tied_at_the_real_shape(hf_run):
    for stage in bench.TRAINED:
        merged = hf_run["stages"][stage]["hf_merged"]
        assert merged["tie_word_embeddings"] is True, stage
        assert merged["lm_head_stored"] is False, stage  # the head is the embedding, stored once
        assert merged["stored_parameters"] == QWEN25_05B_PARAMETERS, stage
        assert hf_run["stages"][stage]["metrics"]["steps"] == STEPS


@pytest.mark.slow
@pytest.mark.integration
def test_hf_backend_exports_and_peft_reload_reproduce_the_merged_model(hf_run):
    _exports_pass(hf_run)
    for stage in bench.TRAINED:
        reload = hf_run["stages"][stage]["peft_reload"]
        assert "error" not in reload, reload.get("error")
        assert reload["max_abs_diff"] < RELOAD_ATOL and reload["argmax_agreement"] == 1.0, (stage, reload)
        assert reload["merged_loaded_tied"] and reload["peft_base_tied"], (stage, reload)
        assert reload["merged_loaded_parameters"] == QWEN25_05B_PARAMETERS


@pytest.mark.slow
@pytest.mark.megatron_cpu
def test_megatron_import_matches_hf_logits_at_the_real_shape(megatron_run):
    checks = megatron_run["import"]["parity"]
    assert checks and all(c["max_abs_diff"] <= c["atol"] for c in checks), checks
    _exports_pass(megatron_run)


@pytest.mark.slow
@pytest.mark.megatron_cpu
def test_megatron_hf_merged_tie_facts_at_the_real_shape(megatron_run):
    """What NeMo's importer and exporter do with Qwen2.5-0.5B's tied embedding, as measured (BENCHMARKS.md
    "Real-shape CPU tier": untied, +136,134,656 parameters in hf_merged). Either way hf_merged must say so
    consistently (a stored head equal to the embedding and an untied config, or no stored head and a tied
    config), and PEFT's reload of hf_adapter must reproduce its logits."""
    for stage in bench.TRAINED:
        merged = megatron_run["stages"][stage]["hf_merged"]
        if merged["tie_word_embeddings"]:
            assert not merged["lm_head_stored"] and merged["stored_parameters"] == QWEN25_05B_PARAMETERS, merged
        else:
            # NeMo's importer unties (HFQwen2Importer.config: share_embeddings_and_output_weights=False) and its
            # exporter writes tie_word_embeddings=False: the head is a second copy, equal under LoRA (both frozen)
            assert merged["lm_head_stored"] and merged["stored_parameters"] == QWEN25_05B_PARAMETERS + EMBEDDING, merged
            assert merged["lm_head_equals_embed_tokens"] is True, merged
        reload = megatron_run["stages"][stage]["peft_reload"]
        assert "error" not in reload, reload.get("error")
        assert reload["max_abs_diff"] < RELOAD_ATOL and reload["argmax_agreement"] == 1.0, (stage, reload)

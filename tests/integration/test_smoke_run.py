"""The main job end to end on CPU: the real CLI, NeMo-Run's local executor, the tiny Qwen2.

Checks the artifacts of every stage, that the adapters trained, that adapter+base equals the
merged model, that CPT lowers Japanese perplexity, and that a killed run resumes exactly
(test_exact_resume.py).
"""

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
METRIC_KEYS = ("steps", "train_loss_first", "train_loss_last", "val_loss_ja", "val_ppl_ja", "val_loss_en", "val_ppl_en",
               "base_val_ppl_ja", "base_val_ppl_en", "tokens_per_second", "trainable_params", "total_params",
               "wall_seconds")
# fp32 on CPU: the adapter computes x@A^T@B^T*s on the fly, the merged model has W + s*B@A; only the
# summation order differs.
LOGITS_ATOL = 1e-4


def test_every_stage_writes_its_artifacts(smoke_run):
    run_dir, stdout, wall = smoke_run
    for stage in ("cpt", "sft"):
        d = run_dir / stage
        assert (d / "hf_adapter" / "adapter_config.json").exists()
        assert (d / "hf_adapter" / "adapter_model.safetensors").exists()
        assert (d / "hf_merged" / "config.json").exists() and (d / "hf_merged" / "tokenizer.json").exists()
        metrics = json.loads((d / "metrics.json").read_text())
        for key in METRIC_KEYS:
            assert metrics[key] is not None, key
        steps = 16 if stage == "cpt" else 10
        assert metrics["steps"] == steps
        assert 0 < metrics["trainable_params"] < metrics["total_params"]
        checks = json.loads((d / "export.json").read_text())["checks"]
        # the exact checks of an hf lora stage: an empty or shortened list would pass `all(ok)`
        assert sorted(c["check"] for c in checks) == ["hf_merged_vs_trained", "peft_adapter_vs_hf_merged"]
        assert all(c["ok"] is True for c in checks), checks
    assert list((run_dir / "wandb").glob("offline-run-*"))
    # the printed table: gain and forgetting per stage, and where the artifacts are
    assert "JA before" in stdout and "EN before" in stdout and str(run_dir / "cpt" / "hf_adapter") in stdout


def test_cpt_lowers_japanese_perplexity(smoke_run):
    metrics = json.loads((smoke_run[0] / "cpt" / "metrics.json").read_text())
    assert metrics["val_ppl_ja"] < metrics["base_val_ppl_ja"]
    # Per-step train losses are too noisy at 16 steps (each step sees other blocks), so the training
    # loss is compared on fixed blocks of the Japanese training data: base vs. the CPT result.
    from jp_peft.export.verify import validation_loss

    spec = json.loads((smoke_run[0] / "spec.json").read_text())
    ja_train = spec["cpt"]["data"]["blend"][0]["prefix"]
    seq = spec["cpt"]["data"]["seq_length"]
    assert validation_loss(str(smoke_run[0] / "cpt" / "hf_merged"), ja_train, seq, 16) < validation_loss(metrics["base_model"], ja_train, seq, 16)


def test_sft_starts_from_the_cpt_result(smoke_run):
    run_dir = smoke_run[0]
    cpt = json.loads((run_dir / "cpt" / "metrics.json").read_text())
    sft = json.loads((run_dir / "sft" / "metrics.json").read_text())
    assert sft["base_model"] == str((run_dir / "cpt" / "hf_merged").resolve())
    assert sft["base_val_ppl_ja"] == pytest.approx(cpt["val_ppl_ja"], rel=1e-4)


@pytest.mark.parametrize("stage", ["cpt", "sft"])
def test_adapter_trained_and_matches_merged_model(smoke_run, stage):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    d = smoke_run[0] / stage
    weights = load_file(d / "hf_adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert len(lora_b) == 4 * 7  # 4 layers x 7 projections
    assert all(float(b.abs().max()) > 0 for b in lora_b)  # B starts at zero: every one of them moved
    config = json.loads((d / "hf_adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).is_dir()
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                       "down_proj"])
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    adapted = PeftModel.from_pretrained(base, d / "hf_adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(d / "hf_merged").eval()
    ids = torch.randint(0, merged.config.vocab_size - 64, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        with adapted.disable_adapter():
            plain = adapted(input_ids=ids).logits
    assert (a - b).abs().max() < LOGITS_ATOL
    assert (a - plain).abs().max() > 1e-3  # and the adapter does change the model


# A stopped stage resuming exactly (SIGKILL, SIGTERM, SIGINT at a checkpoint, dropout on): test_exact_resume.py.


def test_megatron_side_validation_loss_matches_the_hf_backend(smoke_run):
    """The held-out evaluation of exported HF models (jp_peft.export.verify) gives the hf backend's numbers on
    the same blocks (the Megatron tier checks its own forward against it the same way)."""
    from jp_peft.export.verify import validation_loss

    run_dir = smoke_run[0]
    spec = json.loads((run_dir / "spec.json").read_text())
    metrics = json.loads((run_dir / "cpt" / "metrics.json").read_text())
    blocks = spec["cpt"]["train"]["limit_val_batches"] * spec["cpt"]["train"]["micro_batch_size"]
    base = validation_loss(metrics["base_model"], spec["cpt"]["data"]["val_ja"], spec["cpt"]["data"]["seq_length"], blocks)
    after = validation_loss(str(run_dir / "cpt" / "hf_merged"), spec["cpt"]["data"]["val_ja"], spec["cpt"]["data"]["seq_length"], blocks)
    assert base == pytest.approx(metrics["base_val_loss_ja"], abs=1e-4)
    assert after == pytest.approx(metrics["val_loss_ja"], abs=1e-4)

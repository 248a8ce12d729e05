"""The training methods on NeMo's real Megatron path (CPU engine, the embedded tiny model), through the real
`jp-peft stage` CLI on the megatron_run fixture's imported base and prepared data:

- lora_embed: the embeddings and output layer train (untied, at embed_lr = 0.1 x lr) beside the adapters,
  travel in the PEFT adapter as modules_to_save, and every export reproduces the trained checkpoint;
- full: every parameter trains, early stopping ends the stage at the step a crafted validation curve
  dictates, the export is a whole model (no adapter), and SFT starts from it;
- lora: what the shared run trained (adapters only, no saved modules).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jp_peft.records.metrics import read_stage_metrics

pytestmark = pytest.mark.megatron_cpu
REPO = Path(__file__).resolve().parents[2]
TINY_VOCAB, TINY_HIDDEN = 2048, 192


def _spec(run_dir: Path, name: str, tmp: Path, cpt_method: str, **cpt_train) -> Path:
    spec = json.loads((run_dir / "spec.json").read_text())
    spec.update(name=name, group="smoke", stages=["cpt", "sft", "export"])
    spec["wandb"]["enabled"] = False
    spec["cpt"]["method"] = cpt_method
    spec["cpt"]["train"].update({"max_steps": 6, "val_check_interval": 3, "ckpt_every_n_steps": 3,
                                 "limit_val_batches": 2, "warmup_steps": 1, **cpt_train})
    spec["sft"]["train"].update(max_steps=4, val_check_interval=4, ckpt_every_n_steps=4, limit_val_batches=2,
                                warmup_steps=1)
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def _stage(spec: Path, env: dict, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "jp_peft.cli", "stage", *args, "--spec", str(spec)], cwd=REPO,
                          env={**env, "WANDB_MODE": "disabled"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def _rows(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]


def _measured_equals_exported(stage_dir: Path, spec: Path, stage: str = "cpt") -> None:
    """The losses the Megatron forward measured while training are what the exported HF model scores."""
    from jp_peft.export.verify import validation_loss

    m = read_stage_metrics(stage_dir / "metrics.json")
    s = json.loads(spec.read_text())[stage]
    blocks = s["train"]["limit_val_batches"] * s["train"]["micro_batch_size"]
    for lang in ("ja", "en"):
        hf = validation_loss(str(stage_dir / "hf_merged"), s["data"][f"val_{lang}"], s["data"]["seq_length"], blocks)
        assert hf == pytest.approx(getattr(m, f"val_loss_{lang}"), abs=1e-4), lang


def _checks(stage_dir: Path) -> dict[str, dict]:
    record = json.loads((stage_dir / "export.json").read_text())
    assert all(c["ok"] and c["argmax_agreement"] == 1.0 for c in record["checks"]), record["checks"]
    return {c["check"]: c for c in record["checks"]}


def test_lora_trains_the_adapters_only(megatron_run):
    run_dir = megatron_run[0]
    m = read_stage_metrics(run_dir / "cpt" / "metrics.json")
    assert m.method == "lora" and 0 < m.trainable_params < m.total_params
    config = json.loads((run_dir / "cpt" / "hf_adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None


def test_lora_embed_trains_embeddings_apart_at_their_rate_and_exports_them(megatron_run, tmp_path):
    import torch
    from safetensors.torch import load_file

    run_dir, _, env = megatron_run
    spec = _spec(run_dir, "methods_lora_embed", tmp_path, "lora_embed", embed_lr=1e-3, lr=1e-2)
    _stage(spec, env, "cpt")
    out = run_dir.parent / "methods_lora_embed" / "cpt"
    m, lora = read_stage_metrics(out / "metrics.json"), read_stage_metrics(run_dir / "cpt" / "metrics.json")
    assert m.method == "lora_embed" and m.steps == 6
    # the adapters of plain lora, plus the untied embedding and output layer (NeMo's importer unties them)
    assert m.trainable_params - lora.trainable_params == 2 * TINY_VOCAB * TINY_HIDDEN
    steps = [r for r in _rows(out) if "train/loss" in r]
    assert len(steps) == 6 and all(r["train/lr_embed"] == pytest.approx(0.1 * r["train/lr"], rel=1e-9) for r in steps)
    assert steps[1]["train/lr"] == pytest.approx(1e-2)  # the peak after one warmup step: the schedule is real

    _stage(spec, env, "export", "--target", "cpt")
    checks = _checks(out)
    assert list(checks) == ["trained_vs_nemo_merged", "nemo_merged_vs_hf_merged", "peft_adapter_vs_hf_merged"]
    adapter = out / "hf_adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["embed_tokens", "lm_head"]
    saved = load_file(adapter / "adapter_model.safetensors")
    embed, head = saved["base_model.model.model.embed_tokens.weight"], saved["base_model.model.lm_head.weight"]
    base = load_file(Path(json.loads((run_dir / "import" / "base.json").read_text())["base_dir"]) / "model.safetensors")
    start = base["model.embed_tokens.weight"]
    assert embed.shape == head.shape == start.shape
    assert float((embed - start).abs().max()) > 1e-4 and float((head - start).abs().max()) > 1e-4  # both trained
    assert not torch.equal(embed, head)  # apart: the tie is gone on this backend, and the export says so
    assert json.loads((out / "hf_merged" / "config.json").read_text())["tie_word_embeddings"] is False
    _measured_equals_exported(out, spec)


def test_full_stops_early_exports_a_whole_model_and_sft_starts_from_it(megatron_run, tmp_path):
    run_dir, _, env = megatron_run
    # min_delta 100: the first validation (step 3) is the best there will be; patience 1 stops at the next (6)
    spec = _spec(run_dir, "methods_full", tmp_path, "full", max_steps=12, lr=1e-3, early_stopping_patience=1,
                 early_stopping_min_delta=100.0)
    stdout = _stage(spec, env, "cpt")
    out = run_dir.parent / "methods_full"
    m = read_stage_metrics(out / "cpt" / "metrics.json")
    assert m.method == "full" and m.steps == 6 and m.early_stopped_at_step == 6
    assert "val/ja_loss" in m.stop_reason and "at step 3" in m.stop_reason and "early stopping at step 6" in stdout
    assert m.trainable_params == m.total_params
    assert [r["trainer/global_step"] for r in _rows(out / "cpt") if "val/ja_loss" in r] == [0, 3, 6]

    _stage(spec, env, "export", "--target", "cpt")
    checks = _checks(out / "cpt")
    assert list(checks) == ["trained_vs_nemo_merged", "nemo_merged_vs_hf_merged"]
    assert checks["trained_vs_nemo_merged"]["max_abs_diff"] == 0.0  # the same weights, saved without the optimizer
    record = json.loads((out / "cpt" / "export.json").read_text())
    assert record["hf_adapter"] is None and not (out / "cpt" / "hf_adapter").exists()
    assert (out / "cpt" / "model.nemo").stat().st_size > 0
    _measured_equals_exported(out / "cpt", spec)

    _stage(spec, env, "sft")  # lora on top of the full CPT's merged model
    sft = read_stage_metrics(out / "sft" / "metrics.json")
    assert sft.base_model == str((out / "cpt" / "hf_merged").resolve())
    assert sft.base_val_loss_ja == pytest.approx(m.val_loss_ja, abs=1e-5)  # the CPT result, unchanged

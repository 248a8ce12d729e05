"""QLoRA (model.quantization: nf4) on the hf backend through the real `jp-peft stage` CLI, on the smoke run's prepared
data: a few CPT or SFT steps on the tiny model's 4-bit base on CPU lower the loss the stage trains on (CPT: the
Japanese held-out text; SFT: the reply tokens of the examples it trained on, measured on the 4-bit base with and
without the adapter), and the export merges the adapter into the full-precision base with its parity figure
against the 4-bit training model. (dpo with nf4: tests/integration/test_dpo_run.py.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jp_peft.spec import load_preset, resolve_spec

pytestmark = pytest.mark.integration


def _stage(spec: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "jp_peft.cli", "stage", *args, "--spec", str(spec)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _reply_loss(model, examples) -> float:
    """Mean cross-entropy on the reply tokens (the SFT loss) of `examples` ((ids, labels) pairs)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in examples:
            logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0]
            target = torch.tensor(labels[1:])
            n = int((target != -100).sum())
            total += float(torch.nn.functional.cross_entropy(logits, target, ignore_index=-100)) * n
            count += n
    return total / count


def _sft_loss_before_after(spec, out: Path) -> tuple[float, float]:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from jp_peft.backends.hf.data import load_sft_examples
    from jp_peft.backends.hf.methods import load_base

    base = json.loads((out / "metrics.json").read_text())["base_model"]
    examples = load_sft_examples(spec.sft.data.sft_train, AutoTokenizer.from_pretrained(base),
                                 spec.sft.data.seq_length)[:32]
    before = _reply_loss(load_base(base, model_spec=spec.model).eval(), examples)
    trained = PeftModel.from_pretrained(load_base(base, model_spec=spec.model), str(out / "hf_adapter")).eval()
    return before, _reply_loss(trained, examples)


@pytest.mark.slow  # ~2 min each on 2 busy cores: `make test-all` runs them
@pytest.mark.parametrize("stage", ["cpt", "sft"])
def test_qlora_trains_on_a_4bit_base_and_exports_a_full_precision_merge(smoke_run, tmp_path, stage):
    run_dir = smoke_run[0]
    # sft at 5e-3 (the preset's 1e-3 barely moves the tiny model in 12 steps); sft starts from the base here
    steps = {"cpt": [], "sft": ["sft.train.lr=5e-3"]}[stage]
    spec = resolve_spec(load_preset("smoke"), [
        f"output_dir={run_dir.parent}", f"name=qlora_{stage}", "group=smoke", f"stages=[{stage},export]",
        "wandb.enabled=false", "model.quantization=nf4", f"{stage}.train.max_steps=12",
        f"{stage}.train.val_check_interval=6", f"{stage}.train.limit_val_batches=2",
        f"{stage}.train.global_batch_size=4", f"{stage}.train.ckpt_every_n_steps=6", *steps])
    path = tmp_path / "qlora.json"
    path.write_text(json.dumps(spec.to_dict()))
    _stage(path, stage)
    out = run_dir.parent / f"qlora_{stage}" / stage
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["extra"]["quantization"] == {"type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    assert metrics["steps"] == 12 and [r["trainer/global_step"] for r in metrics["val_history"]] == [6, 12]
    if stage == "cpt":  # the 4-bit base's own held-out loss, lowered by LoRA
        before, after = metrics["base_val_loss_ja"], metrics["val_loss_ja"]
    else:
        before, after = _sft_loss_before_after(spec, out)
    print(f"QLoRA {stage}: loss {before:.4f} -> {after:.4f}")
    assert after < before

    _stage(path, "export", "--target", stage)
    record = json.loads((out / "export.json").read_text())
    checks = {c["check"]: c for c in record["checks"]}
    assert set(checks) == {"hf_merged_vs_trained_nf4", "peft_adapter_vs_hf_merged"} and all(c["ok"] for c in checks.values())
    nf4 = checks["hf_merged_vs_trained_nf4"]
    print(f"QLoRA {stage} parity: merged (fp32) vs 4-bit trained max |logit diff| {nf4['max_abs_diff']:.3e} (base gap "
          f"{nf4['base_gap']:.3e}), top-1 agreement {nf4['top1_agreement']:.3f}; adapter vs merged "
          f"{checks['peft_adapter_vs_hf_merged']['max_abs_diff']:.1e}")
    assert nf4["base_gap"] > 0 and nf4["atol"] == pytest.approx(2 * nf4["base_gap"] + 1e-4)
    merged = json.loads((out / "hf_merged" / "config.json").read_text())
    assert "quantization_config" not in merged and merged["torch_dtype" if "torch_dtype" in merged else "dtype"] == "float32"

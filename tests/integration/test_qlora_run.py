"""QLoRA (model.quantization: nf4) on the hf backend through the real `jp-peft stage` CLI, on the smoke run's prepared
data: a few CPT steps on the tiny model's 4-bit base on CPU lower the Japanese held-out loss, and the export merges
the adapter into the full-precision base with its parity figure against the 4-bit training model."""

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


@pytest.mark.slow  # ~2 min on 2 busy cores: `make test-all` runs it
def test_qlora_cpt_trains_on_a_4bit_base_and_exports_a_full_precision_merge(smoke_run, tmp_path):
    run_dir = smoke_run[0]
    spec = resolve_spec(load_preset("smoke"), [
        f"output_dir={run_dir.parent}", "name=qlora", "group=smoke", "stages=[cpt,export]", "wandb.enabled=false",
        "model.quantization=nf4", "cpt.train.max_steps=8", "cpt.train.val_check_interval=4",
        "cpt.train.limit_val_batches=2", "cpt.train.global_batch_size=4", "cpt.train.ckpt_every_n_steps=4"])
    path = tmp_path / "qlora.json"
    path.write_text(json.dumps(spec.to_dict()))
    _stage(path, "cpt")
    out = run_dir.parent / "qlora" / "cpt"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["extra"]["quantization"] == {"type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    assert metrics["val_loss_ja"] < metrics["base_val_loss_ja"]  # the 4-bit base's own loss, lowered by LoRA
    print(f"QLoRA cpt: JA held-out loss {metrics['base_val_loss_ja']:.4f} -> {metrics['val_loss_ja']:.4f}")

    _stage(path, "export", "--target", "cpt")
    record = json.loads((out / "export.json").read_text())
    checks = {c["check"]: c for c in record["checks"]}
    assert set(checks) == {"hf_merged_vs_trained_nf4", "peft_adapter_vs_hf_merged"} and all(c["ok"] for c in checks.values())
    nf4 = checks["hf_merged_vs_trained_nf4"]
    print(f"QLoRA parity: merged (fp32) vs 4-bit trained max |logit diff| {nf4['max_abs_diff']:.3e} (base gap "
          f"{nf4['base_gap']:.3e}), top-1 agreement {nf4['top1_agreement']:.3f}; adapter vs merged "
          f"{checks['peft_adapter_vs_hf_merged']['max_abs_diff']:.1e}")
    assert nf4["base_gap"] > 0 and nf4["atol"] == pytest.approx(2 * nf4["base_gap"] + 1e-4)
    merged = json.loads((out / "hf_merged" / "config.json").read_text())
    assert "quantization_config" not in merged and merged["torch_dtype" if "torch_dtype" in merged else "dtype"] == "float32"

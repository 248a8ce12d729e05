"""The training methods through the real `jp-peft stage` CLI on the smoke run's prepared data: a full
CPT that early stopping ends at the right step, its export checks (no adapter), and an SFT that starts
from the CPT's merged model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jp_peft.spec import resolve_spec
from jp_peft.spec import load_preset

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _spec(run_dir: Path, name: str, tmp: Path, *overrides: str) -> Path:
    values = load_preset("smoke")
    spec = resolve_spec(values, [f"output_dir={run_dir.parent}", f"name={name}", "group=smoke", "stages=[cpt,sft,export]",
                                 "wandb.enabled=false", "train.limit_val_batches=1", *overrides])
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec.to_dict()))
    return path


def _stage(spec: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "jp_peft.cli", "stage", *args, "--spec", str(spec)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_full_cpt_stops_early_exports_no_adapter_and_sft_starts_from_it(smoke_run, tmp_path):
    run_dir = smoke_run[0]
    # min_delta 100: the first validation is the best there will be; patience 1 stops at the second (step 8)
    spec = _spec(run_dir, "methods_full", tmp_path, "cpt.method=full", "cpt.train.max_steps=16",
                 "cpt.train.val_check_interval=4", "cpt.train.early_stopping_patience=1",
                 "cpt.train.early_stopping_min_delta=100", "sft.train.max_steps=4", "sft.train.val_check_interval=4")
    _stage(spec, "cpt")
    out = run_dir.parent / "methods_full"
    metrics = json.loads((out / "cpt" / "metrics.json").read_text())
    assert metrics["method"] == "full" and metrics["steps"] == 8 and metrics["early_stopped_at_step"] == 8
    assert "val/ja_loss" in metrics["stop_reason"] and "at step 4" in metrics["stop_reason"]
    assert metrics["trainable_params"] == metrics["total_params"]
    assert (out / "cpt" / "hf_merged").is_dir() and not (out / "cpt" / "hf_adapter").exists()

    _stage(spec, "export", "--target", "cpt")
    record = json.loads((out / "cpt" / "export.json").read_text())
    assert record["hf_adapter"] is None and [c["check"] for c in record["checks"]] == ["hf_merged_vs_trained"]
    assert all(c["ok"] for c in record["checks"])

    _stage(spec, "sft")
    sft = json.loads((out / "sft" / "metrics.json").read_text())
    assert sft["base_model"] == str((out / "cpt" / "hf_merged").resolve())
    assert sft["base_val_loss_ja"] == pytest.approx(metrics["val_loss_ja"], rel=1e-5)  # the CPT result, unchanged

"""The NeMo Megatron path on a CUDA GPU: import the base, a few LoRA CPT steps, hf-peft export,
and NeMo-vs-Hugging Face logits parity. Skipped (with the reason shown) on machines without CUDA.

Run on a GPU machine with:  pytest -m gpu tests/test_gpu_megatron.py
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu


def test_megatron_cpt_export_and_parity(tmp_path, tiny_base):
    """The real experiment script on the Megatron backend with the tiny HF model as the base:
    import -> data -> cpt (Megatron LoRA) -> export (jp-peft hf-peft exporter, merge_lora, hf) -> eval."""
    env_overrides = [f"model.name={tiny_base}", "model.tiny=false", "model.nemo_config=Qwen25Config500M",
                     "cpt.train.max_steps=20", "cpt.train.val_check_interval=10", "cpt.train.limit_val_batches=2",
                     "cpt.data.seq_length=256", "stages=[import,data,cpt,export,eval]", "wandb.enabled=false"]
    proc = subprocess.run([sys.executable, "experiments/qwen_lora_ja.py", "--executor", "local", "--backend", "megatron",
                           "--output-dir", str(tmp_path), "--name", "gpu", *env_overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    stage = tmp_path / "gpu" / "cpt"
    check = json.loads((stage / "export_check.json").read_text())
    assert check["ok"] and (stage / "model.nemo").exists()
    assert (stage / "hf_adapter" / "adapter_model.safetensors").exists()

"""The NeMo Megatron path on a CUDA GPU. Skipped (with the reason shown) on machines without CUDA.

1. `--smoke --backend megatron` on the GPU: the embedded tiny model through import -> data -> cpt
   (Megatron LoRA on CUDA) -> export (hf-peft adapter, merge_lora, hf, .nemo) -> eval, with the
   run's own parity records (import/base.json, cpt/export.json `checks`).
2. bench/gpu_lora_throughput.py's GPU path, briefly (seq 512, a few steps, one micro batch): the
   random-weight Qwen2.5-0.5B through all three configurations, the export and the parity checks.

Run on a GPU machine with:  pytest -m gpu tests/test_gpu_megatron.py     (about 5-8 minutes)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.gpu


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "NEMO_HOME": str(tmp_path / "nemo_home"), "WANDB_MODE": "disabled",
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_megatron_smoke_on_the_gpu(tmp_path):
    """The tiny model on CUDA (cluster.accelerator stays gpu when a GPU is present). SFT is left out: the
    smoke preset packs SFT sequences, which Megatron runs only with Transformer Engine."""
    overrides = ["cpt.train.max_steps=20", "cpt.train.val_check_interval=10", "cpt.train.limit_val_batches=2",
                 "cpt.train.ckpt_every_n_steps=10", "stages=[import,data,cpt,export,eval]", "eval.limit=40"]
    proc = subprocess.run([sys.executable, "experiments/qwen_lora_ja.py", "--executor", "local", "--smoke",
                           "--backend", "megatron", "--no-wandb", "--output-dir", str(tmp_path), "--name", "gpu",
                           *overrides], cwd=REPO, capture_output=True, text=True, timeout=1800, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run = tmp_path / "gpu"
    base = json.loads((run / "import" / "base.json").read_text())
    assert [c["check"] for c in base["parity"]] == ["hf_base_vs_nemo_import"] and base["parity"][0]["ok"]
    export = json.loads((run / "cpt" / "export.json").read_text())
    assert {c["check"] for c in export["checks"]} == {"trained_vs_nemo_merged", "nemo_merged_vs_hf_merged",
                                                  "peft_adapter_vs_hf_merged"}
    for check in export["checks"]:
        assert check["ok"] and check["max_abs_diff"] <= check["atol"] and check["argmax_agreement"] == 1.0, check
    assert (run / "cpt" / "model.nemo").stat().st_size > 0
    assert (run / "cpt" / "hf_adapter" / "adapter_model.safetensors").exists()
    steps = [json.loads(x) for x in (run / "cpt" / "train_log.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in steps if "perf/tokens_per_s" in r]
    assert [r["trainer/global_step"] for r in steps] == list(range(1, 21))
    assert all(r["perf/peak_memory_mb"] > 0 and r["perf/tokens_per_s"] > 0 for r in steps)  # CUDA allocator's peak
    summary = json.loads((run / "summary.json").read_text())
    assert summary["backend"] == "megatron" and summary["stages"][0]["ja_ppl_after"] > 0


def test_bench_gpu_path_briefly(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_lora_throughput.py", "--seq", "512", "--micro-batches", "2",
                           "--global-batch", "4", "--steps", "5", "--warmup", "2", "--parity-steps", "10",
                           "--time-budget", "0", "--work-dir", str(tmp_path / "work"),
                           "--results", str(tmp_path / "results")],
                          cwd=REPO, capture_output=True, text=True, timeout=1800, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    [path] = list((tmp_path / "results").glob("gpu_lora_throughput_gpu_*.json"))
    result = json.loads(path.read_text())
    assert result["mode"] == "gpu" and result["complete"] and result["machine"]["gpu"]
    assert result["model"]["parameters"] == 494_032_768
    for config in ("megatron", "hf_backend", "plain_hf_peft"):
        best = result["configurations"][config]["best"]["512"]
        assert best["tokens_per_s"] > 0 and best["peak_memory_mb"] > 0
        if result["workload"]["peak_tflops"]:
            assert 0 < best["mfu"] < 1
    parity = result["parity"]
    assert parity["steps"] == 10 and all(c["ok"] for c in parity["export_checks"] + parity["import_checks"])
    # fp32 on CPU on both sides; random weights give near-ties, so allow 2 of 2,048 argmax flips
    assert parity["nemo_vs_peft"]["max_abs_diff"] <= 1e-4 and parity["nemo_vs_peft"]["top1_agreement"] >= 0.999
    assert parity["round_trip"]["max_abs_diff"] == 0.0 and not parity["round_trip"]["shape_mismatch"]

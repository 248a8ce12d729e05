"""LoRA FLOP accounting against a hand computation, and `jp-peft compare` on two runs."""

import json
import shutil
import subprocess
import sys

import pytest

from jp_peft.training.flops import QWEN25_05B, lora_flops_per_token
from jp_peft.spec import HF_LORA_TARGETS


@pytest.mark.unit
def test_mfu_formula_for_qwen25_05b_by_hand():
    # Per layer: q 896x896, k 896x128, v 896x128, o 896x896, gate/up 896x4864, down 4864x896
    per_layer = 896 * 896 * 2 + 896 * 128 * 2 + 896 * 4864 * 3
    assert per_layer == 14_909_440
    frozen = 24 * per_layer + 151_936 * 896  # + LM head (untied in NeMo's config)
    assert QWEN25_05B.frozen_linear_params() == frozen == 493_961_216
    # LoRA r=32 on all seven: r * (in + out) per projection
    lora = 24 * 32 * ((896 + 896) * 2 + (896 + 128) * 2 + (896 + 4864) * 2 + (4864 + 896))
    assert QWEN25_05B.lora_params(32, HF_LORA_TARGETS) == lora == 17_596_416
    seq = 2048
    attention = 3 * 4 * 24 * seq * 14 * 64
    expected = 4 * frozen + 6 * lora + attention
    assert lora_flops_per_token(QWEN25_05B, seq, 32, HF_LORA_TARGETS) == expected
    assert expected == 2_609_905_664
    # 120,000 tokens/s on one H100 (989 TFLOP/s dense bf16): 31.7% MFU with this accounting (the
    # benchmark issue's "about 26%" leaves out the LM head; we count it: it is a frozen GEMM too)
    mfu = expected * 120_000 / 989e12
    assert mfu == pytest.approx(0.3167, abs=1e-4)


@pytest.mark.integration
def test_compare_two_runs_writes_table_and_plots(smoke_run, tmp_path):
    run_dir = smoke_run[0]
    other = tmp_path / "smoke-rank8"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("wandb", "launches", "hf_*", "checkpoints"))
    spec = json.loads((other / "spec.json").read_text())
    spec["lora"]["rank"] = 8
    (other / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "compare"
    proc = subprocess.run([sys.executable, "-m", "jp_peft.cli", "compare", str(run_dir), str(other), "--output", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    table = (out / "compare.md").read_text()
    assert "| smoke |" in table and "| smoke-rank8 |" in table
    runs_header = next(line for line in table.splitlines() if line.startswith("| run |"))  # the runs table, first
    assert "lora.rank" in runs_header  # the config difference is a column
    assert "ja_gain_%" in table and "en_forgetting_%" in table
    rows = json.loads((out / "compare.json").read_text())
    assert [r["lora.rank"] for r in rows] == [32, 8]
    # the downstream columns: the last stage's task averages and their change against base (summary.json's)
    summary = json.loads((run_dir / "summary.json").read_text())["stages"][-1]
    for column, key in (("ja_avg", "ja_avg"), ("en_avg", "en_avg"), ("ja_gain_pt", "ja_gain"),
                        ("en_forgetting_pt", "en_forgetting")):
        assert column in table and rows[0][column] == pytest.approx(summary[key])
    for png in ("val_loss_vs_tokens.png", "loss_vs_tokens.png", "gain_forgetting_ppl.png", "gain_forgetting_tasks.png",
                "task_averages.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "<table" in (out / "compare.html").read_text()

"""Per-step throughput numbers equal hand-computed values for a known step.

StepMetrics (training/step_metrics.py) is driven with small stand-ins for Lightning's trainer and the
module (plain objects with the attributes it reads; nothing of jp-peft replaced), and the FLOP count
(training/flops.py) is checked against the formula worked out by hand for a small decoder.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from jp_peft.training.flops import DecoderShape, lora_flops_per_token, method_flops_per_token
from jp_peft.training.step_metrics import StepMetrics

pytestmark = pytest.mark.unit

# 2 layers, hidden 8, 2 heads of 4, 1 KV head (kv dim 4), FFN 16, vocab 32.
SHAPE = DecoderShape(num_layers=2, hidden=8, num_heads=2, num_kv_heads=1, ffn=16, vocab=32)
# one layer's projections: q 8x8=64, k 8x4=32, v 8x4=32, o 8x8=64, gate 8x16=128, up 128, down 16x8=128 -> 576
# frozen linear params: 2 x 576 + LM head 32 x 8 = 1152 + 256 = 1408
# LoRA r=2 on q and v: per layer 2*(8+8) + 2*(8+4) = 32 + 24 = 56; 2 layers: 112
# attention at seq 16: 3 x 4 x 2 layers x 16 x 2 heads x 4 = 3072
LORA_QV = 4 * 1408 + 6 * 112 + 3072  # = 5632 + 672 + 3072 = 9376


def test_flops_per_token_by_hand():
    assert SHAPE.frozen_linear_params() == 1408
    assert SHAPE.lora_params(2, ["q_proj", "v_proj"]) == 112
    assert lora_flops_per_token(SHAPE, 16, 2, ["q_proj", "v_proj"]) == LORA_QV == 9376
    assert method_flops_per_token(SHAPE, 16, "lora", 2, ["q_proj", "v_proj"]) == 9376
    assert method_flops_per_token(SHAPE, 16, "lora_embed", 2, ["q_proj", "v_proj"]) == 9376 + 2 * 256
    assert method_flops_per_token(SHAPE, 16, "full") == 6 * 1408 + 3072


class FakeLogger:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))


def test_a_known_step_logs_its_tokens_per_second_and_tflops(tmp_path, monkeypatch):
    monkeypatch.setenv("JP_PEFT_PEAK_TFLOPS", "0.5")  # a known peak: MFU is checked too
    log = tmp_path / "train_log.jsonl"
    callback = StepMetrics(log, flops_per_token=2.0e9, stage="cpt")
    logger = FakeLogger()
    optimizer = SimpleNamespace(param_groups=[{"lr": 3e-4}])
    trainer = SimpleNamespace(global_step=0, max_steps=10, optimizers=[optimizer], loggers=[logger], global_rank=0,
                              world_size=1)
    module = SimpleNamespace(consumed_tokens=0, train_spec=SimpleNamespace(global_batch_size=4),
                             last_batch_tokens=1000, last_grad_norm=0.5)
    callback.on_train_start(trainer, module)
    batch = {"input_ids": torch.zeros(4, 256, dtype=torch.long)}
    callback.on_train_batch_start(trainer, module, batch, 0)
    callback.step_start -= 2.0  # the step began 2 s ago (plus the microseconds this test takes)
    trainer.global_step = 1  # the optimizer step is done when the batch ends
    callback.on_train_batch_end(trainer, module, torch.tensor(2.5), batch, 0)

    (row,) = [json.loads(line) for line in log.read_text().splitlines()]
    seconds = row["perf/step_time_s"]
    assert seconds >= 2.0  # perf_counter is monotonic: no upper bound, no timing race
    assert row["trainer/global_step"] == 1 and row["train/loss"] == 2.5 and row["train/lr"] == 3e-4
    assert row["train/grad_norm"] == 0.5
    # 1000 real tokens in `seconds`: tokens/s, samples/s (4 sequences), TFLOP/s = 2e9 FLOP/token x tokens/s / 1e12
    assert row["perf/tokens_per_s"] == 1000 / seconds
    assert row["perf/samples_per_s"] == 4 / seconds
    assert row["perf/tflops_per_s"] == 2.0e9 * 1000 / seconds / 1e12
    assert row["perf/mfu"] == row["perf/tflops_per_s"] / 0.5
    assert row["perf/consumed_tokens"] == 1000 and row["perf/consumed_samples"] == 4
    # at exactly 2 s these would be 500 tokens/s and 1.0 TFLOP/s: the measured values are that within the delay
    assert row["perf/tokens_per_s"] == pytest.approx(500.0 * 2.0 / seconds, rel=1e-12)
    assert module.consumed_tokens == 1000
    assert logger.logged[0][0] == 1 and logger.logged[0][1]["perf/tokens_per_s"] == row["perf/tokens_per_s"]

    # a second step continues the counters
    callback.on_train_batch_start(trainer, module, batch, 1)
    trainer.global_step = 2
    module.last_batch_tokens = 600
    callback.on_train_batch_end(trainer, module, torch.tensor(2.0), batch, 1)
    second = json.loads(log.read_text().splitlines()[1])
    assert second["perf/consumed_tokens"] == 1600 and second["perf/consumed_samples"] == 8
    assert second["perf/tokens_per_s"] == 600 / second["perf/step_time_s"]

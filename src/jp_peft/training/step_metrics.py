"""Per-step training metrics against `trainer/global_step`, to the loggers and to train_log.jsonl.

train loss, learning rate, gradient norm (before clipping), step time, tokens/s, samples/s,
consumed tokens, peak memory (GPU or process RSS), TFLOP/s and MFU (see training/flops.py).
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from jp_peft.training.flops import peak_tflops
from jp_peft.records.metrics import LEARNING_RATE, MFU, TFLOPS_PER_S
from jp_peft.records.progress import progress_line


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class StepMetrics(pl.Callback):
    def __init__(self, log_path: str | Path, flops_per_token: float, stage: str = "train"):
        self.log_path = Path(log_path)
        self.flops_per_token = flops_per_token
        self.stage = stage
        self.step_seconds: list[float] = []
        self.peak = peak_tflops()
        self._reset()
        self.consumed_tokens = 0
        self.consumed_samples = 0
        self.history: list[dict] = []

    def _reset(self):
        self.step_start = None
        self.losses: list[float] = []
        self.tokens = 0
        self.samples = 0
        self.grad_norm = None

    def on_train_start(self, trainer, pl_module):
        # A resumed run continues the counters where the checkpoint left them, and forgets the
        # steps logged after that checkpoint (they are trained again): no step appears twice.
        self.consumed_tokens = int(getattr(pl_module, "consumed_tokens", 0))
        self.consumed_samples = trainer.global_step * pl_module.train_spec.global_batch_size
        if trainer.global_rank == 0:  # one writer of the stage's log (DDP: every rank runs this callback)
            truncate_log(self.log_path, trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.step_start is None:
            self.step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # One batch is one optimizer step (backends/hf/trainer.py accumulates micro batches itself).
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        self.tokens += int(pl_module.last_batch_tokens)
        self.samples += int(batch["input_ids"].shape[0])
        self.grad_norm = pl_module.last_grad_norm
        self._log_step(trainer, pl_module)

    def _log_step(self, trainer, pl_module):
        seconds = max(time.perf_counter() - self.step_start, 1e-9)
        self.consumed_tokens += self.tokens
        self.consumed_samples += self.samples
        pl_module.consumed_tokens = self.consumed_tokens
        tflops = self.flops_per_token * self.tokens / seconds / 1e12
        row = {
            "trainer/global_step": trainer.global_step,
            "train/loss": sum(self.losses) / len(self.losses),
            LEARNING_RATE: trainer.optimizers[0].param_groups[0]["lr"],
            "train/grad_norm": self.grad_norm,
            "perf/step_time_s": seconds,
            "perf/tokens_per_s": self.tokens / seconds,
            "perf/samples_per_s": self.samples / seconds,
            "perf/consumed_tokens": self.consumed_tokens,
            "perf/consumed_samples": self.consumed_samples,
            "perf/peak_memory_mb": peak_memory_mb(),
            TFLOPS_PER_S: tflops,
        }
        if self.peak:  # the step's FLOPs ran on every rank's device: the share of all of them
            row[MFU] = tflops / (self.peak * trainer.world_size)
        assert all(v is None or math.isfinite(v) for v in row.values()), f"non-finite metric at step {trainer.global_step}"
        self.history.append(row)
        self.step_seconds.append(seconds)
        if trainer.global_rank != 0:  # the row is the same on every rank (the step loss is reduced)
            return
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        print(progress_line(self.stage, trainer.global_step, trainer.max_steps, row["train/loss"],
                            row["perf/tokens_per_s"], self.step_seconds), flush=True)
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in row.items() if k != "trainer/global_step"}, step=trainer.global_step)
        self._reset()


class MegatronStepMetrics(pl.Callback):
    """The same per-step rows on NeMo's Megatron strategy, where one Lightning batch is one global
    batch: tokens/step = global batch x seq length, against trainer/global_step. Rank 0 writes
    train_log.jsonl (a resumed run drops the rows after its checkpoint, as StepMetrics does) and
    prints one progress line per step."""

    def __init__(self, log_path: str, tokens_per_step: int, flops_per_token: float, stage: str = "train",
                 method: str = "lora"):
        self.log_path = Path(log_path)
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.stage, self.method = stage, method
        self.peak = peak_tflops()
        self.started = None
        self.step_seconds: list[float] = []

    def on_train_start(self, trainer, pl_module):
        # what this stage's method trains, as the hf backend logs it (after NeMo's PEFT transform froze the rest)
        from jp_peft.records.metrics import params_record

        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in pl_module.parameters())
        for logger in trainer.loggers:
            logger.log_hyperparams(params_record(trainable, total, self.method))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.started = time.perf_counter()
        # the rates this step trains at: NeMo's scheduler moves them on inside the step (after the optimizer)
        self.step_lrs = (_lr_of(trainer), _lr_of(trainer, decoupled=True))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.started is None:
            return
        seconds = max(time.perf_counter() - self.started, 1e-9)
        if not self.step_seconds and trainer.global_rank == 0:
            # The first step of this process: a resumed run drops the rows its checkpoint does not cover.
            # (Decided here, not in on_train_start: NeMo restores a PEFT run's step with its adapters.)
            truncate_log(self.log_path, trainer.global_step - 1)
        self.step_seconds.append(seconds)
        tflops = self.flops_per_token * self.tokens_per_step / seconds / 1e12
        row = {"trainer/global_step": trainer.global_step, "train/loss": _loss_of(outputs, trainer),
               LEARNING_RATE: self.step_lrs[0], "perf/step_time_s": seconds,
               "perf/tokens_per_s": self.tokens_per_step / seconds,
               "perf/consumed_tokens": trainer.global_step * self.tokens_per_step,
               "perf/peak_memory_mb": peak_memory_mb(), TFLOPS_PER_S: tflops}
        if self.peak:
            row[MFU] = tflops / self.peak
        if self.step_lrs[1] is not None:
            row["train/lr_embed"] = self.step_lrs[1]
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in row.items() if k != "trainer/global_step"}, step=trainer.global_step)
        if trainer.global_rank == 0:
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
            print(progress_line(self.stage, trainer.global_step, trainer.max_steps, row["train/loss"],
                                row["perf/tokens_per_s"], self.step_seconds), flush=True)


def truncate_log(log_path: Path, global_step: int) -> None:
    """Keep the rows up to `global_step` (a resumed run trains the later steps again)."""
    if not log_path.exists():
        return
    keep = [line + "\n" for line in log_path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("trainer/global_step", 0) <= global_step]
    log_path.write_text("".join(keep), encoding="utf-8")


def _loss_of(outputs, trainer) -> float | None:
    """NeMo's training_step returns the step's reduced loss (a tensor, or a dict with 'loss')."""
    value = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if value is None:
        value = trainer.callback_metrics.get("reduced_train_loss")
    return float(value) if value is not None else None


def _lr_of(trainer, decoupled: bool = False) -> float | None:
    """The learning rate of the step: of the main groups, or (decoupled=True) of the groups Megatron keeps
    apart for the embeddings and output layer under lora_embed's embed_lr (None when there are none)."""
    try:
        groups = [g for g in trainer.optimizers[0].param_groups if bool(g.get("is_decoupled_lr")) == decoupled]
        return float(groups[0]["lr"]) if groups else None
    except (IndexError, KeyError, AttributeError, TypeError):
        return None

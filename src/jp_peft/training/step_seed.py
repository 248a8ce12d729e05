"""Each optimizer step's random draws (LoRA and other dropout) from generators seeded by (seed, step).

NeMo 2 saves no RNG state in its checkpoints, and even a saved state would not make a resumed run
draw what the uninterrupted run drew: between a checkpoint and the next step the uninterrupted run
keeps drawing (every DataLoader iterator NeMo's validation creates takes a seed from torch's default
generator), the resumed one instead draws for the adapters it initialises. Seen on the tiny model:
~1e-3 in the loss from the first resumed step with LoRA dropout 0.1, none with dropout 0. Seeding
at the start of every step makes a step's masks a function of the step alone, as megatron-core
seeds per pipeline stage (nemo/lightning/megatron_init.py _set_random_seed: seed + 100 x pp rank).
"""

from __future__ import annotations

import hashlib

import lightning.pytorch as pl
import torch


def step_seed(seed: int, pipeline_rank: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{pipeline_rank}:{step}".encode()).digest()[:4], "little")


class StepSeed(pl.Callback):
    """Seeds torch's generator at the start of every optimizer step from (seed, pipeline rank, step).

    `megatron=True` (the Megatron backend) also takes the pipeline rank from megatron-core and seeds its
    tensor-parallel CUDA tracker; the hf backend has one pipeline stage (rank 0)."""

    def __init__(self, seed: int, megatron: bool = False):
        self.seed, self.megatron = seed, megatron

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pipeline_rank = 0
        if self.megatron:
            from megatron.core import parallel_state

            pipeline_rank = parallel_state.get_pipeline_model_parallel_rank()
        value = step_seed(self.seed, pipeline_rank, trainer.global_step)
        torch.manual_seed(value)
        if self.megatron and torch.cuda.is_available() and torch.cuda.is_initialized():
            from megatron.core import tensor_parallel

            tensor_parallel.model_parallel_cuda_manual_seed(value)  # the tensor-parallel tracker too

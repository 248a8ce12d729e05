"""Japanese and English held-out losses, measured separately during NeMo Megatron training.

NeMo's validation reports one loss over one (blended) validation set. A continual pre-training
run needs two numbers: the Japanese loss going down (the gain) and the English one not going up
(the forgetting). This callback measures both with the model being trained, through its own
Megatron forward, on the same fixed held-out blocks the Hugging Face backend uses
(jp_peft.data.blocks.EvalBlocks): before the first step (the baseline, kept in a file so that a
resumed run reports the same starting point), every `every_n_steps` steps, and after the last.
Rows go to the loggers (W&B) and, on rank 0, to train_log.jsonl.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import torch

from jp_peft.data.blocks import EvalBlocks
from jp_peft.records.layout import write_json
from jp_peft.records.metrics import STEP, validation_row


class LanguageValidation(pl.Callback):
    VALIDATION_HISTORY = True  # `history` holds the validation rows early stopping reads (training/early_stopping.py)

    def __init__(self, prefixes: dict[str, str], seq_length: int, max_blocks: int, every_n_steps: int,
                 log_path: str, baseline_path: str, checkpoint_dir: str, micro_batch: int = 4,
                 tokens_per_step: int | None = None):
        self.prefixes = dict(prefixes)
        self.tokens_per_step = tokens_per_step  # global batch x seq length: a row's consumed tokens
        self.seq_length, self.max_blocks, self.micro_batch = seq_length, max_blocks, micro_batch
        self.every_n_steps = every_n_steps
        self.log_path, self.baseline_path = Path(log_path), Path(baseline_path)
        self.checkpoint_dir = checkpoint_dir
        self.baseline: dict[str, float] = {}
        self.final: dict[str, float] = {}
        self.history: list[dict] = []
        self._last_step = None

    # --- measuring ------------------------------------------------------------------------------
    @torch.no_grad()
    def losses(self, pl_module) -> dict[str, float]:
        """Token-mean cross-entropy per language, with the model as it is now (eval mode)."""
        from megatron.core import parallel_state

        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise RuntimeError("per-language validation runs the model's whole forward in one process: "
                               "it needs cluster.pipeline_parallel=1")
        device = next(pl_module.parameters()).device
        was_training = pl_module.training
        pl_module.eval()
        out = {}
        try:
            for lang, prefix in self.prefixes.items():
                blocks = EvalBlocks(prefix, self.seq_length, self.max_blocks)
                total, count = 0.0, 0
                for start in range(0, len(blocks), self.micro_batch):
                    items = [blocks[i] for i in range(start, min(start + self.micro_batch, len(blocks)))]
                    tokens = torch.stack([x["input_ids"] for x in items]).to(device)
                    labels = torch.stack([x["labels"] for x in items]).to(device)
                    positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
                    # Megatron's GPTModel returns the per-token loss when given labels ([batch, seq])
                    per_token = pl_module.forward(input_ids=tokens, position_ids=positions, attention_mask=None,
                                                  labels=labels)
                    total += float(per_token.float().sum())
                    count += labels.numel()
                out[lang] = total / count
        finally:
            pl_module.train(was_training)
        from jp_peft.training.ranks import several_ranks

        if several_ranks():
            import torch.distributed as dist

            # Every rank measures the same blocks with the same model: tensor-parallel ranks share one result,
            # data-parallel ones agree up to summation order. Rank 0's values are what every rank records and
            # early stopping decides on, so all ranks stop at the same step.
            values = torch.tensor([out[lang] for lang in self.prefixes], dtype=torch.float64)
            dist.broadcast(values, 0)
            out = dict(zip(self.prefixes, values.tolist()))
        return out

    def _record(self, trainer, losses: dict[str, float]) -> dict:
        consumed = trainer.global_step * self.tokens_per_step if self.tokens_per_step else None
        row = validation_row(trainer.global_step, losses, self.baseline, consumed)
        self.history.append(row)
        self._last_step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in row.items() if k != STEP}, step=trainer.global_step)
        if trainer.global_rank == 0:
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
            print("[jp-peft] validation at step {}: {}".format(
                trainer.global_step, ", ".join(f"{lang} loss {loss:.4f} (ppl {math.exp(loss):.2f})"
                                               for lang, loss in losses.items())), flush=True)
        return row

    # --- when -----------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        # A resumed run (NeMo restores its step only at the first epoch start, so its checkpoint tells):
        # the starting point was measured before the first step of the first attempt.
        if self.baseline_path.exists() and any(Path(self.checkpoint_dir).glob("*-last")):
            self.baseline = json.loads(self.baseline_path.read_text(encoding="utf-8"))
            return
        self.baseline = self.losses(pl_module)
        if trainer.global_rank == 0:
            write_json(self.baseline_path, self.baseline)
        self._record(trainer, self.baseline)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.history and self.log_path.exists():  # resumed: the rows its checkpoint covers
            self.history = [row for row in map(json.loads, self.log_path.read_text(encoding="utf-8").splitlines())
                            if "val/ja_loss" in row and row["trainer/global_step"] < trainer.global_step]
        if trainer.global_step % self.every_n_steps == 0 and trainer.global_step != self._last_step:
            self._record(trainer, self.losses(pl_module))

    def on_train_end(self, trainer, pl_module):
        if self._last_step == trainer.global_step and self.history:
            self.final = {lang: self.history[-1][f"val/{lang}_loss"] for lang in self.prefixes}
        else:
            self.final = self.losses(pl_module)
            self._record(trainer, self.final)

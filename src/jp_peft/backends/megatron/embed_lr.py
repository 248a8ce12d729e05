"""The learning rate of lora_embed's input embeddings and output layer on the Megatron backend.

Megatron puts those parameters in their own optimizer group when optim.config.decoupled_lr is set
(megatron/core/optimizer/__init__.py `_get_param_groups`, group key `is_decoupled_lr`), and records
max_lr/min_lr for it; but NeMo's CosineAnnealing schedules every group from the lr the group had when
the scheduler was built (nemo/core/optim/lr_scheduler.py `_get_lr` over `base_lrs`), which Megatron left
at config.lr for all of them. Before each optimizer step this callback sets the decoupled groups to
`ratio` (embed_lr / lr) times the rate the scheduler gave the others, so they follow the same warmup and
decay at their own scale, as the hf backend's embed group does. Nothing is stored: a resumed stage
recomputes the same rate.
"""

from __future__ import annotations

import lightning.pytorch as pl

# Megatron's names of the input embeddings and the output layer (GPTModel / LanguageModule).
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"


def is_embedding_or_output(name: str) -> bool:
    """A parameter or checkpoint key of the input embeddings or the output layer, under any wrapper prefix."""
    return name.endswith((EMBEDDING, OUTPUT_LAYER))


def decoupled_groups(optimizer) -> tuple[list[dict], list[dict]]:
    """(decoupled groups, the others) of a Megatron optimizer's param groups."""
    groups = list(optimizer.param_groups)
    if not groups or any("is_decoupled_lr" not in g for g in groups):
        raise RuntimeError("embed_lr: the optimizer's param groups carry no `is_decoupled_lr` key; this is not the "
                           "megatron.core optimizer (megatron-core 0.15) jp-peft was written against")
    return [g for g in groups if g["is_decoupled_lr"]], [g for g in groups if not g["is_decoupled_lr"]]


class EmbedLearningRate(pl.Callback):
    def __init__(self, ratio: float):
        self.ratio = ratio
        self.checked = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for optimizer in trainer.optimizers:
            embed, rest = decoupled_groups(optimizer)
            if not embed:
                raise RuntimeError("embed_lr: no optimizer group holds the embeddings/output layer "
                                   "(optim.config.decoupled_lr unset, or they are frozen)")
            if not self.checked:
                self._check_membership(pl_module, embed)
            scheduled = {g["lr"] for g in rest if g["params"]}
            if len(scheduled) != 1:
                raise RuntimeError(f"embed_lr: the other optimizer groups disagree on the scheduled lr: {scheduled}")
            (lr,) = scheduled
            for group in embed:
                group["lr"] = lr * self.ratio

    def _check_membership(self, pl_module, embed_groups) -> None:
        """Once: the decoupled groups hold exactly the embedding and output-layer weights (by size; the
        distributed optimizer's groups hold shards of them when data parallel > 1, so only checked at 1)."""
        from megatron.core import parallel_state

        self.checked = True
        if parallel_state.get_data_parallel_world_size() != 1:
            return
        in_groups = sum(p.numel() for g in embed_groups for p in g["params"])
        expected = sum(p.numel() for n, p in pl_module.named_parameters() if is_embedding_or_output(n) and p.requires_grad)
        if in_groups != expected:
            raise RuntimeError(f"embed_lr: the decoupled optimizer groups hold {in_groups} values, the embeddings and "
                               f"output layer {expected}")

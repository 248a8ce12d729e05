"""megatron-core's GPTDataset with the loss-mask cache that a resumed run needs.

megatron/core/datasets/gpt_dataset.py:200-211 caches the first sample's attention mask, loss mask
and position ids when they do not depend on the sample (no reset_* flags, no eod_mask_loss), then
zeroes `loss_mask[labels == pad]` in place on the cached tensor itself. With pad == end of document
(Qwen2.5's tokenizer, and the tiny one) every later sample inherits the first sample's masked
positions, so the loss mask depends on which sample a process happened to read first: a run
resumed from a checkpoint sees other masks than the uninterrupted run (losses differ ~5e-3 from the
first resumed step). Recomputing the masks per sample (cheap: ones and an arange) makes every
sample a function of its index alone.
"""

from __future__ import annotations

from megatron.core.datasets.gpt_dataset import GPTDataset


class ExactResumeGPTDataset(GPTDataset):
    """GPTDataset whose masks never come from a cache that an earlier sample modified."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not hasattr(self, "masks_and_position_ids_are_cacheable"):
            raise RuntimeError("megatron.core GPTDataset no longer has masks_and_position_ids_are_cacheable: "
                               "re-check gpt_dataset.py's mask cache before relying on ExactResumeGPTDataset")
        self.masks_and_position_ids_are_cacheable = False

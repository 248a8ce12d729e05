"""Held-out loss of an exported Hugging Face model, measured the way both backends measure it in training."""

from __future__ import annotations

import torch


@torch.no_grad()
def validation_loss(model_dir: str, val_prefix: str, seq_length: int, max_blocks: int = 64) -> float:
    """Token-mean cross-entropy of a Hugging Face model on held-out indexed-dataset blocks."""
    from transformers import AutoModelForCausalLM

    from jp_peft.data.blocks import EvalBlocks

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).to(device).eval()
    blocks = EvalBlocks(val_prefix, seq_length, max_blocks)
    total, count = 0.0, 0
    for i in range(len(blocks)):
        item = blocks[i]
        logits = model(input_ids=item["input_ids"][None].to(device)).logits[0]
        total += float(torch.nn.functional.cross_entropy(logits, item["labels"].to(device), reduction="sum"))
        count += item["labels"].numel()
    return total / count

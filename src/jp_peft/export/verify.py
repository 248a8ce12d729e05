"""Check an exported adapter: PEFT's adapter on its base must reproduce the merged model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# fp32 on CPU: merge_and_unload adds the same scale*B@A the adapter computes on the fly; the
# difference is summation order only, well below 1e-4 for models of this size.
LOGITS_ATOL = 1e-4


@torch.no_grad()
def compare_adapter_and_merged(adapter_dir: Path, merged_dir: Path, val_prefix: str | None,
                               n_prompts: int = 8, length: int = 64) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jp_peft.data.blocks import EvalBlocks

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], torch_dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), torch_dtype=torch.float32).eval()
    blocks = EvalBlocks(val_prefix, length, n_prompts)
    ids = torch.stack([blocks[i]["input_ids"] for i in range(len(blocks))])
    a = with_adapter(input_ids=ids).logits
    b = merged(input_ids=ids).logits
    diff = (a - b).abs().max().item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return {"max_abs_diff": diff, "argmax_agreement": agree, "atol": LOGITS_ATOL, "ok": diff <= LOGITS_ATOL,
            "prompts": int(ids.shape[0]), "tokens_per_prompt": int(ids.shape[1]),
            "base": config["base_model_name_or_path"]}


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

"""Glue between a stage's spec and the FLOP accounting of callbacks/flops.py."""

from __future__ import annotations

from jp_peft.callbacks.flops import lora_flops_per_token, shape_of_hf_config


def flops_per_token_fn(peft_model, stage_spec) -> float:
    """Training FLOPs per token of this LoRA model at the stage's sequence length."""
    config = peft_model.base_model.model.config
    lora = peft_model.peft_config["default"]
    return lora_flops_per_token(shape_of_hf_config(config), stage_spec.data.seq_length, lora.r, sorted(lora.target_modules))

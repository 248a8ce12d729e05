"""Glue between a stage's spec and the FLOP accounting of callbacks/flops.py."""

from __future__ import annotations

from jp_peft.callbacks.flops import method_flops_per_token, shape_of_hf_config


def flops_per_token_fn(model, stage_spec) -> float:
    """Training FLOPs per token of this model (a PeftModel, or a plain one under method full) at the
    stage's sequence length."""
    config = model.config
    lora = getattr(model, "peft_config", {}).get("default")
    rank, targets = (lora.r, sorted(lora.target_modules)) if lora is not None else (0, ())
    return method_flops_per_token(shape_of_hf_config(config), stage_spec.data.seq_length,
                                  getattr(stage_spec, "method", "lora"), rank, targets)

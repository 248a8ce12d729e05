"""FLOP accounting for LoRA training of a dense decoder, and the peak FLOP/s it is measured against.

Per token, with N_frozen the frozen linear weights (all projections and the LM head):
  - frozen GEMMs: forward 2*N plus backward input-gradients 2*N = 4*N (no weight gradients),
    i.e. 2/3 of the 6*N of full training;
  - trainable LoRA weights: full cost, 6*N_lora;
  - attention scores and values: 4*s*h*hd per layer forward (QK^T and AV, no causal discount,
    the convention of PaLM's MFU and Megatron's throughput reports), times 3 for fwd+bwd.
The embedding lookup is free. Other methods (`method_flops_per_token`):
  - lora_embed: as lora, but the LM head is trained (6*V*h; tied to the embedding, whose
    gradient is a scatter-add, free like the lookup);
  - full: every linear weight trained, 6*N, no LoRA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Dense (non-sparse) peak throughput per device for the training dtype, from vendor datasheets:
# NVIDIA H100 SXM5 and H200 datasheets (BF16 Tensor Core, dense), NVIDIA A100 datasheet.
PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


@dataclass(frozen=True)
class DecoderShape:
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    ffn: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one layer, in Hugging Face names."""
        kv = self.num_kv_heads * self.head_dim
        return {"q_proj": (self.hidden, self.hidden), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (self.hidden, self.hidden), "gate_proj": (self.hidden, self.ffn),
                "up_proj": (self.hidden, self.ffn), "down_proj": (self.ffn, self.hidden)}

    def frozen_linear_params(self) -> int:
        per_layer = sum(i * o for i, o in self.linear_shapes().values())
        return self.num_layers * per_layer + self.vocab * self.hidden  # + LM head

    def lora_params(self, rank: int, targets) -> int:
        shapes = self.linear_shapes()
        return self.num_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


QWEN25_05B = DecoderShape(num_layers=24, hidden=896, num_heads=14, num_kv_heads=2, ffn=4864, vocab=151936)


def shape_of_hf_config(config) -> DecoderShape:
    return DecoderShape(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                        config.num_key_value_heads, config.intermediate_size, config.vocab_size)


def shape_of_hf_dict(config: dict) -> DecoderShape:
    return DecoderShape(config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
                        config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"])


def lora_flops_per_token(shape: DecoderShape, seq_length: int, rank: int, targets) -> float:
    frozen = 4.0 * shape.frozen_linear_params()
    trainable = 6.0 * shape.lora_params(rank, targets)
    attention = 3.0 * 4.0 * shape.num_layers * seq_length * shape.num_heads * shape.head_dim
    return frozen + trainable + attention


def method_flops_per_token(shape: DecoderShape, seq_length: int, method: str, rank: int = 0, targets=()) -> float:
    """Training FLOPs per token of a stage trained with `method` (spec.METHODS)."""
    attention = 3.0 * 4.0 * shape.num_layers * seq_length * shape.num_heads * shape.head_dim
    head = shape.vocab * shape.hidden
    if method == "full":
        return 6.0 * shape.frozen_linear_params() + attention
    lora = lora_flops_per_token(shape, seq_length, rank, targets)
    if method == "lora_embed":
        return lora + 2.0 * head  # the head's weight gradient on top of its frozen 4*V*h
    if method == "lora":
        return lora
    raise ValueError(f"method: {method!r} is not one of lora, lora_embed, full")


def peak_tflops() -> float | None:
    """Peak dense bf16 TFLOP/s of the current device, None where unknown (e.g. CPU)."""
    override = os.environ.get("JP_PEFT_PEAK_TFLOPS")
    if override:
        return float(override)
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    except Exception:
        return None
    for key, value in PEAK_TFLOPS_BF16.items():
        if key in name:
            return value
    return None


def model_flops_per_token(model, stage_spec) -> float:
    """Training FLOPs per token of a Hugging Face model (a PeftModel, or a plain one under method full)
    at the stage's sequence length, counting what its method trains."""
    lora = getattr(model, "peft_config", {}).get("default")
    rank, targets = (lora.r, sorted(lora.target_modules)) if lora is not None else (0, ())
    return method_flops_per_token(shape_of_hf_config(model.config), stage_spec.data.seq_length,
                                  getattr(stage_spec, "method", "lora"), rank, targets)

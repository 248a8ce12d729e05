"""Qwen2.5-0.5B's architecture as data: its Hugging Face config and its parameter count.

The GPU benchmark builds the model from this config (random weights, no download), and a real-shape
CPU tier checks shapes against it; keeping one copy means both measure the same architecture.
"""

from __future__ import annotations

# Qwen2.5-0.5B's config.json as shipped (Qwen/Qwen2.5-0.5B), less the fields transformers fills itself.
QWEN25_05B_HF_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "hidden_act": "silu", "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "initializer_range": 0.02, "attention_dropout": 0.0, "use_sliding_window": False,
    "sliding_window": 32768, "max_window_layers": 24, "bos_token_id": 151643, "eos_token_id": 151643,
}
# Parameters of Qwen2.5-0.5B, tied embeddings counted once: 151936*896 (embedding) + 24 layers x
# (q 896*896+896, k and v 896*128+128 each, o 896*896, gate/up/down 3*896*4864, 2 norms 2*896) + 896.
QWEN25_05B_PARAMETERS = 494_032_768


def hf_config(values: dict = QWEN25_05B_HF_CONFIG):
    """A transformers config of `values` (a config.json as a dict; Qwen2.5-0.5B's by default)."""
    from transformers import AutoConfig

    rest = {k: v for k, v in values.items() if k not in ("architectures", "model_type")}
    return AutoConfig.for_model(values["model_type"], **rest)


def parameter_count(config) -> int:
    """Parameters of the causal LM built from `config` (a transformers config, or a config.json dict)
    on the meta device, so nothing is allocated; tied weights are counted once."""
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(config, dict):
        config = hf_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())

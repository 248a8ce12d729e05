"""Spec LoRA targets (HF names) -> NeMo LoRA / CanonicalLoRA, exactly or not at all."""

import pytest

from jp_peft.backends.megatron.lora_mapping import LoraMappingError, nemo_peft_kwargs, to_nemo_targets
from jp_peft.spec import HF_LORA_TARGETS, LoraSpec

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("hf, cls, nemo", [
    (HF_LORA_TARGETS, "LoRA", ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")),
    (("q_proj", "k_proj", "v_proj"), "LoRA", ("linear_qkv",)),
    (("o_proj", "down_proj"), "LoRA", ("linear_proj", "linear_fc2")),
    (("gate_proj", "up_proj"), "LoRA", ("linear_fc1",)),
    (("q_proj", "k_proj", "v_proj", "o_proj"), "LoRA", ("linear_qkv", "linear_proj")),
])
def test_translation_picks_the_exact_nemo_adapter(hf, cls, nemo):
    targets = to_nemo_targets(hf)
    assert (targets.peft_class, targets.target_modules) == (cls, nemo)


def test_rank_alpha_dropout_carry_over():
    cls, kwargs = nemo_peft_kwargs(LoraSpec(rank=8, alpha=32, dropout=0.05,
                                            target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
    assert cls == "LoRA"
    assert kwargs == {"target_modules": ["linear_qkv", "linear_proj"], "dim": 8, "alpha": 32, "dropout": 0.05,
                      "dropout_position": "pre"}


@pytest.mark.parametrize("bad, match", [
    (("q_proj", "qkv_proj"), "not Qwen2 projections"),
    ((), "empty"),
    (("q_proj", "v_proj"), r"splits the fused group q_proj/k_proj/v_proj \(has q_proj, v_proj\)"),
    (("q_proj", "k_proj", "v_proj", "up_proj"), r"gate_proj/up_proj \(has up_proj\)"),
    (("gate_proj",), "CanonicalLoRA crashes on a partial group"),
])
def test_inexpressible_targets_are_errors(bad, match):
    with pytest.raises(LoraMappingError, match=match):
        to_nemo_targets(bad)

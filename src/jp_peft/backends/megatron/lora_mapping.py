"""The spec's LoRA targets (Hugging Face names) -> NeMo's LoRA or CanonicalLoRA targets.

Megatron fuses q/k/v into `linear_qkv` and gate/up into `linear_fc1`. NeMo's fused `LoRA`
puts one adapter on each fused layer (A shared by the fused projections), so it can express a
target set only if it takes whole fused groups: all of q/k/v or none, both gate/up or none.

A set that splits a group (PEFT's classic `[q_proj, v_proj]`) would need `CanonicalLoRA`, but
NeMo 2.7.3's `LoRALinearSplitQKV`/`LoRALinearSplitFC1UpGate` call every adapter of the group in
forward and leave the untargeted ones `None`, so training crashes on the first step
('NoneType' object is not callable; tests/export pins this). Such sets are refused here, before
a GPU job is queued, rather than approximated. The hf backend trains them as asked; the
exporters still read `CanonicalLoRA` checkpoints of whole groups made elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from jp_peft.spec import HF_LORA_TARGETS, LoraSpec

FUSED_GROUPS = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_fc1": ("gate_proj", "up_proj")}
SINGLE = {"o_proj": "linear_proj", "down_proj": "linear_fc2"}
CANONICAL = {"q_proj": "linear_q", "k_proj": "linear_k", "v_proj": "linear_v", "o_proj": "linear_proj",
             "gate_proj": "linear_fc1_gate", "up_proj": "linear_fc1_up", "down_proj": "linear_fc2"}
# Order NeMo lists them in, so composed configs read the same as NVIDIA's defaults.
FUSED_ORDER = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


class LoraMappingError(ValueError):
    pass


@dataclass(frozen=True)
class NemoLoraTargets:
    peft_class: str  # "LoRA" or "CanonicalLoRA" (names in nemo.collections.llm.peft)
    target_modules: tuple[str, ...]


def to_nemo_targets(hf_targets) -> NemoLoraTargets:
    targets = set(hf_targets)
    unknown = targets - set(HF_LORA_TARGETS)
    if unknown:
        raise LoraMappingError(f"lora.target_modules: {sorted(unknown)} are not Qwen2 projections {HF_LORA_TARGETS}")
    if not targets:
        raise LoraMappingError("lora.target_modules: empty")
    split = [f"{'/'.join(group)} (has {', '.join(t for t in group if t in targets)})"
             for group in FUSED_GROUPS.values() if not (targets.isdisjoint(group) or targets.issuperset(group))]
    if split:
        raise LoraMappingError(
            f"lora.target_modules: {sorted(targets)} splits the fused group {' and '.join(split)}. "
            "NeMo 2.7.3 runs LoRA on whole groups only (CanonicalLoRA crashes on a partial group); "
            "target all of a group or none of it, e.g. [q_proj, k_proj, v_proj, o_proj], or use --backend hf")
    names = {fused for fused, group in FUSED_GROUPS.items() if targets.issuperset(group)}
    names |= {SINGLE[t] for t in targets if t in SINGLE}
    return NemoLoraTargets("LoRA", tuple(n for n in FUSED_ORDER if n in names))


def nemo_peft_kwargs(lora: LoraSpec) -> tuple[str, dict]:
    """(class name, constructor kwargs) of the NeMo PEFT object for `lora`."""
    if lora.dropout_position != "pre":
        raise LoraMappingError("lora.dropout_position: only 'pre' matches PEFT's LoRA exactly")
    targets = to_nemo_targets(lora.target_modules)
    return targets.peft_class, {"target_modules": list(targets.target_modules), "dim": lora.rank,
                                "alpha": lora.alpha, "dropout": lora.dropout, "dropout_position": "pre"}

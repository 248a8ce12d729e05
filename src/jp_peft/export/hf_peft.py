"""NeMo Megatron LoRA tensors of Qwen2 -> a Hugging Face PEFT adapter, exactly.

Megatron fuses q/k/v into `linear_qkv`, whose output rows are interleaved per query group:
for each group g, the q heads of g, then k_g, then v_g (megatron.core attention's
get_query_key_value_tensors). It fuses gate and up into `linear_fc1`: gate rows first, then up.
A fused LoRA adapter has one A (shared by the fused projections) and one B over the fused rows,
so for PEFT A is copied to each projection and B is split exactly as Megatron splits the output.
CanonicalLoRA already has one adapter per projection. Nothing is approximated: anything the
mapping cannot express raises AdapterExportError naming the tensor.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

HF_PREFIX = "base_model.model.model.layers"
_NAME = re.compile(r"^(?:module\.)*(?:model\.)?(?:module\.)?decoder\.layers\.(\d+)\.(self_attention|mlp)\."
                   r"(linear_qkv|linear_proj|linear_fc1|linear_fc2)\.adapter\.(?:(adapter_\w+)\.)?"
                   r"(linear_in|linear_out)\.weight$")
SINGLE = {"linear_proj": ("self_attn", "o_proj"), "linear_fc2": ("mlp", "down_proj")}
CANONICAL = {"adapter_q": ("self_attn", "q_proj"), "adapter_k": ("self_attn", "k_proj"), "adapter_v": ("self_attn", "v_proj"),
             "adapter_gate": ("mlp", "gate_proj"), "adapter_up": ("mlp", "up_proj")}
AB = {"linear_in": "lora_A", "linear_out": "lora_B"}


class AdapterExportError(ValueError):
    """The adapter cannot be written as an exact PEFT adapter; the message names the tensor."""


def _hf_name(layer: str, block: str, proj: str, which: str) -> str:
    return f"{HF_PREFIX}.{layer}.{block}.{proj}.{AB[which]}.weight"


def split_qkv_rows(tensor: torch.Tensor, num_heads: int, num_groups: int, head_dim: int, name: str):
    """Rows of a fused linear_qkv output (interleaved per group) -> (q, k, v) rows in HF order."""
    per_group = num_heads // num_groups
    expected = (per_group + 2) * num_groups * head_dim
    if tensor.shape[0] != expected:
        raise AdapterExportError(f"{name}: {tensor.shape[0]} rows, expected (heads/groups + 2) x groups x head_dim "
                                 f"= {expected} for {num_heads} heads, {num_groups} groups, head_dim {head_dim}")
    grouped = tensor.reshape(num_groups, per_group + 2, head_dim, *tensor.shape[1:])
    q = grouped[:, :per_group].reshape(num_heads * head_dim, *tensor.shape[1:])
    k = grouped[:, per_group].reshape(num_groups * head_dim, *tensor.shape[1:])
    v = grouped[:, per_group + 1].reshape(num_groups * head_dim, *tensor.shape[1:])
    return q, k, v


def megatron_lora_to_hf_peft(state_dict: dict[str, torch.Tensor], *, num_attention_heads: int, num_query_groups: int,
                             head_dim: int, adapter_type: str = "lora") -> dict[str, torch.Tensor]:
    if adapter_type not in ("lora", "canonical_lora"):
        raise AdapterExportError(f"adapter type {adapter_type!r}: only 'lora' and 'canonical_lora' export exactly")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if "weight_magnitude" in name or ".magnitude" in name:
            raise AdapterExportError(f"{name}: DoRA magnitude vectors have no exact PEFT LoRA equivalent")
        match = _NAME.match(name)
        if not match:
            raise AdapterExportError(f"{name}: not a Qwen2 LoRA adapter tensor this exporter knows")
        layer, _block, target, sub, which = match.groups()
        tensor = tensor.detach().to(torch.float32).contiguous()
        if adapter_type == "canonical_lora" and target in ("linear_qkv", "linear_fc1"):
            if sub not in CANONICAL:
                raise AdapterExportError(f"{name}: CanonicalLoRA on {target} needs adapter_q/k/v or adapter_gate/up")
            block, proj = CANONICAL[sub]
            out[_hf_name(layer, block, proj, which)] = tensor
        elif sub is not None:
            raise AdapterExportError(f"{name}: a per-projection adapter under fused LoRA; export with adapter_type="
                                     "'canonical_lora'")
        elif target in SINGLE:
            block, proj = SINGLE[target]
            out[_hf_name(layer, block, proj, which)] = tensor
        elif which == "linear_in":  # fused A: shared, one copy per projection
            projs = ("q_proj", "k_proj", "v_proj") if target == "linear_qkv" else ("gate_proj", "up_proj")
            block = "self_attn" if target == "linear_qkv" else "mlp"
            for proj in projs:
                out[_hf_name(layer, block, proj, which)] = tensor.clone()
        elif target == "linear_qkv":
            for proj, part in zip(("q_proj", "k_proj", "v_proj"),
                                  split_qkv_rows(tensor, num_attention_heads, num_query_groups, head_dim, name)):
                out[_hf_name(layer, "self_attn", proj, which)] = part.contiguous()
        else:  # linear_fc1 B: gate rows, then up rows
            if tensor.shape[0] % 2:
                raise AdapterExportError(f"{name}: {tensor.shape[0]} rows cannot split into gate and up halves")
            gate, up = tensor.chunk(2, dim=0)
            out[_hf_name(layer, "mlp", "gate_proj", which)] = gate.contiguous()
            out[_hf_name(layer, "mlp", "up_proj", which)] = up.contiguous()
    _check_pairs(out)
    return out


def _check_pairs(tensors: dict[str, torch.Tensor]) -> None:
    for name, a in tensors.items():
        if ".lora_A." not in name:
            continue
        b_name = name.replace(".lora_A.", ".lora_B.")
        if b_name not in tensors:
            raise AdapterExportError(f"{name}: no matching lora_B")
        if tensors[b_name].shape[1] != a.shape[0]:
            raise AdapterExportError(f"{b_name}: rank {tensors[b_name].shape[1]} != lora_A rank {a.shape[0]}")


def hf_adapter_config(*, rank: int, alpha: float, dropout: float, target_modules_hf, base_model_name_or_path: str) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
            "target_modules": sorted(target_modules_hf), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "base_model_name_or_path": base_model_name_or_path}


def write_hf_peft_adapter(out_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """adapter_model.safetensors + adapter_config.json, written aside and renamed into place."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


_REGISTERED = False


def register_qwen2_hf_peft_exporter():
    """Register `io.model_exporter(Qwen2Model, "hf-peft")` so llm.export_ckpt(target="hf-peft") works for Qwen2."""
    global _REGISTERED
    from nemo.collections.llm.gpt.model.qwen2 import HFQwen2Exporter, Qwen2Model
    from nemo.lightning import io

    if _REGISTERED:
        return Qwen2Model

    class HFQwen2PEFTExporter(HFQwen2Exporter):
        """NeMo Qwen2 LoRA checkpoint -> Hugging Face PEFT adapter (jp-peft)."""

        def apply(self, output_path: Path) -> Path:
            from nemo.collections.llm.peft import CanonicalLoRA, LoRA

            peft = io.load_context(str(self), subpath="model.model_transform")
            if not isinstance(peft, (LoRA, CanonicalLoRA)) or type(peft).__name__ == "DoRA":
                raise AdapterExportError(f"{type(peft).__name__}: only LoRA and CanonicalLoRA export exactly")
            if getattr(peft, "dropout_position", "pre") != "pre":
                raise AdapterExportError("dropout_position='post' has no PEFT equivalent")
            source, _ = self.nemo_load(str(self))
            cfg = source.config
            adapters = {k: v for k, v in source.state_dict().items() if ".adapter." in k}
            tensors = megatron_lora_to_hf_peft(
                adapters, num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
                head_dim=cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads,
                adapter_type="canonical_lora" if isinstance(peft, CanonicalLoRA) else "lora")
            from jp_peft.lora_mapping import to_hf_targets

            targets = to_hf_targets(type(peft).__name__, peft.target_modules)
            config = hf_adapter_config(rank=peft.dim, alpha=peft.alpha, dropout=peft.dropout,
                                       target_modules_hf=targets, base_model_name_or_path=str(self.base_model_path()))
            return write_hf_peft_adapter(output_path, tensors, config)

        def base_model_path(self) -> str:
            from nemo.lightning.ckpt_utils import ADAPTER_META_FILENAME, ckpt_to_weights_subdir

            meta = ckpt_to_weights_subdir(str(self), is_saving=False) / ADAPTER_META_FILENAME
            return json.loads(meta.read_text())["model_ckpt_path"] if meta.exists() else ""

    io.model_exporter(Qwen2Model, "hf-peft")(HFQwen2PEFTExporter)
    _REGISTERED = True
    return Qwen2Model

"""What each training method (spec.METHODS) means on the Hugging Face backend: which parameters
train, at which learning rate, how they are counted, and what the stage exports.

  lora        LoRA on the spec's projections; exports hf_adapter/ + hf_merged/.
  lora_embed  LoRA plus trainable input embeddings and output layer (PEFT modules_to_save), in their
              own optimizer group at train.embed_lr; exports hf_adapter/ (with the saved modules) + hf_merged/.
  full        no PEFT, every parameter trains; exports hf_merged/ only.

QLoRA (model.quantization: nf4, method lora): the base is loaded in 4-bit NF4 with double quantization
(bitsandbytes), prepared with PEFT's prepare_model_for_kbit_training, and LoRA trains on top. The export
merges the adapter into the full-precision base (hf_merged is a plain fp32 model, as without quantization);
how far it is from the quantized model it was trained as is the export's measured parity figure.

Tied embeddings (Qwen2.5-0.5B, the tiny model): under lora_embed PEFT's `ensure_weight_tying` makes the
output layer's trainable copy the embedding's, so the tie holds while training, in the adapter and in the
merged model (which saves one matrix and ties on load). Under full the tie is the model's own.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from jp_peft.spec import LoraSpec, TrainSpec

EMBED_MODULES = ("embed_tokens", "lm_head")


def lora_config(lora: LoraSpec, method: str = "lora", tied: bool = False):
    from peft import LoraConfig

    extra = {}
    if method == "lora_embed":
        extra = {"modules_to_save": list(EMBED_MODULES), "ensure_weight_tying": tied}
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM", **extra)


def compute_dtype(model_spec) -> torch.dtype:
    """What QLoRA's 4-bit layers compute in: the spec's, else bf16 where the GPU has it, else fp32."""
    if model_spec.quantization_compute_dtype:
        return getattr(torch, model_spec.quantization_compute_dtype)
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def load_base(base_dir: str, dtype: torch.dtype = torch.float32, model_spec=None):
    """The base a stage starts from: as saved, or (model.quantization nf4) in 4-bit NF4, ready for k-bit training."""
    from transformers import AutoModelForCausalLM

    if model_spec is None or model_spec.quantization is None:
        return AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=dtype)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute_dtype(model_spec))
    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config, torch_dtype=dtype,
                                                device_map={"": 0} if torch.cuda.is_available() else "cpu")
    return _one_cpu_kernel(prepare_model_for_kbit_training(base, use_gradient_checkpointing=False))


def _one_cpu_kernel(model):
    """Keep every 4-bit layer on the kernel it trains with. On a CPU with AVX512-BF16, bitsandbytes 0.50's
    `Linear4bit.forward` (bitsandbytes/nn/modules.py:613-620: `support_avx512bf16_for_cpu and not self.training`)
    repacks the weight for inference at the first eval-mode forward, and never back: the next training step runs
    `matmul_4bit`'s packed, inference-only path (autograd/_functions.py:422-426) and fails with "a view of a leaf
    Variable that requires grad is being used in an in-place operation". Every stage validates before it trains,
    so QLoRA on such a CPU failed at step 1. Turning the repacking off also keeps validation and the export's
    parity figure on the training kernel. A GPU never takes that branch (it is for CPU inputs only)."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        if not hasattr(layer, "support_avx512bf16_for_cpu"):
            raise RuntimeError(f"bitsandbytes {bnb.__version__}: Linear4bit has no support_avx512bf16_for_cpu; the "
                               "CPU inference repacking jp_peft.backends.hf.methods._one_cpu_kernel turns off has "
                               "changed: read bitsandbytes/nn/modules.py Linear4bit.forward again")
        layer.support_avx512bf16_for_cpu = False
    return model


def quantization_record(model_spec) -> dict:
    """What a QLoRA stage trained on, for metrics.json (the export reads it: its parity figure is against this)."""
    return {"type": model_spec.quantization, "double_quant": True,
            "compute_dtype": str(compute_dtype(model_spec)).removeprefix("torch.")}


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(getattr(model, "base_model", None),
                                                                       "is_loaded_in_4bit", False))


def build_model(base_dir: str, method: str, lora: LoraSpec, dtype: torch.dtype = torch.float32, model_spec=None):
    """The model a stage trains: a PeftModel (lora, lora_embed) or the plain model, all of it trainable (full)."""
    base = load_base(base_dir, dtype, model_spec)
    if method == "full":
        base.requires_grad_(True)
        return base
    from peft import get_peft_model

    return get_peft_model(base, lora_config(lora, method, bool(getattr(base.config, "tie_word_embeddings", False))))


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def _is_embed(name: str) -> bool:
    return ".modules_to_save." in name


def param_groups(model, method: str, train: TrainSpec) -> list[dict]:
    """Trainable parameters by learning rate: the embeddings/output layer of lora_embed at embed_lr, the rest at lr."""
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not _is_embed(n)]
    embed = [p for n, p in model.named_parameters() if p.requires_grad and _is_embed(n)]
    groups = [{"params": rest, "lr": train.lr, "name": "main"}]
    if embed:
        groups.append({"params": embed, "lr": train.embed_lr or train.lr, "name": "embed"})
    return groups


def count_params(model) -> tuple[int, int]:
    """(trainable, total) distinct parameters of the model as trained. PEFT keeps the frozen original of a
    saved module beside its trainable copy; the original is not part of the trained model, so not counted."""
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if ".original_module." not in n)
    return trainable, total


def export(model, tokenizer, base_dir: str, adapter_dir: Path, merged_dir: Path) -> dict[str, str]:
    """merged_dir always, adapter_dir for PEFT models (pointing at a local base so it loads offline);
    each renamed into place when complete. A full stage removes any adapter an earlier run left."""
    written = {}
    if is_peft(model):
        tmp = _fresh(adapter_dir)
        model.save_pretrained(tmp, safe_serialization=True)
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = str(Path(base_dir).resolve())
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        _replace_dir(tmp, adapter_dir)
        written["hf_adapter"] = str(adapter_dir)
    else:
        shutil.rmtree(adapter_dir, ignore_errors=True)
    tmp = _fresh(merged_dir)
    merged = merged_model(model) if not is_quantized(model) else full_precision_merge(base_dir, adapter_dir)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, merged_dir)
    written["hf_merged"] = str(merged_dir)
    return written


def merged_model(model):
    """The plain Hugging Face model: merge_and_unload on a copy (the live PeftModel keeps its adapter)."""
    import copy

    return copy.deepcopy(model).merge_and_unload() if is_peft(model) else model


def full_precision_merge(base_dir: str, adapter_dir: Path):
    """QLoRA's export: the saved adapter merged into the base in full precision (fp32), not into its 4-bit copy."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def _fresh(final: Path) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)

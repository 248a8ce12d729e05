"""What each training method (spec.METHODS) means on the Hugging Face backend: which parameters
train, at which learning rate, how they are counted, and what the stage exports.

  lora        LoRA on the spec's projections; exports hf_adapter/ + hf_merged/.
  lora_embed  LoRA plus trainable input embeddings and output layer (PEFT modules_to_save), in their
              own optimizer group at train.embed_lr; exports hf_adapter/ (with the saved modules) + hf_merged/.
  full        no PEFT, every parameter trains; exports hf_merged/ only.

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


def build_model(base_dir: str, method: str, lora: LoraSpec, dtype: torch.dtype = torch.float32):
    """The model a stage trains: a PeftModel (lora, lora_embed) or the plain model, all of it trainable (full)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=dtype)
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
    merged_model(model).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, merged_dir)
    written["hf_merged"] = str(merged_dir)
    return written


def merged_model(model):
    """The plain Hugging Face model: merge_and_unload on a copy (the live PeftModel keeps its adapter)."""
    import copy

    return copy.deepcopy(model).merge_and_unload() if is_peft(model) else model


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

"""Pieces of the Megatron backend's export stage (backends/megatron_stages.export runs them):
merging a NeMo LoRA checkpoint into its base, and the tied-embedding check of an exported model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def fix_tied_embeddings(hf_dir: Path) -> bool:
    """NeMo's Qwen25Config500M keeps a separate output layer; HF's Qwen2.5-0.5B ties it to the
    embeddings. If the exported config says tied but the weights differ, untie it in the config
    and keep lm_head, so the model loads with the weights that were trained. Returns True if fixed."""
    from safetensors import safe_open

    config_path = hf_dir / "config.json"
    config = json.loads(config_path.read_text())
    lm_head = embed = None
    for shard in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            keys = set(f.keys())
            if "lm_head.weight" in keys:
                lm_head = f.get_tensor("lm_head.weight")
            if "model.embed_tokens.weight" in keys:
                embed = f.get_tensor("model.embed_tokens.weight")
    if not config.get("tie_word_embeddings") or lm_head is None or embed is None:
        return False
    if lm_head.shape == embed.shape and bool((lm_head == embed).all()):
        return False
    config["tie_word_embeddings"] = False
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return True


def merge_lora(lora_checkpoint: Path, output: Path, fp32: bool) -> None:
    """The LoRA checkpoint merged into its base, as a NeMo checkpoint at `output`.

    bf16 runs use NeMo's own llm.peft.merge_lora. It always merges in bf16 (peft/api.py:104 plugin,
    :126-127 model dtype), which rounds an fp32 run's merged weights (PEFT(base + adapter) then differs
    from the merged model by ~4e-3 on the tiny model); fp32 runs merge with the same NeMo pieces
    merge_lora uses, in fp32.
    """
    from nemo.collections import llm

    if output.exists():
        shutil.rmtree(output)
    if not fp32:
        llm.peft.merge_lora(lora_checkpoint_path=str(lora_checkpoint), output_path=str(output))
        return
    import nemo_run as run
    import torch
    from nemo.collections.llm.peft import api as peft_api
    from nemo.collections.llm.peft.lora import LoRAMerge
    from nemo.lightning import MegatronStrategy, Trainer
    from nemo.lightning.pytorch.plugins.mixed_precision import MegatronMixedPrecision

    # as merge_lora does (a run.Config, not an instance: the merged checkpoint's context serialises it)
    trainer = Trainer(devices=1, accelerator="cpu", strategy=MegatronStrategy(
        ddp="pytorch", setup_optimizers=False, plugins=run.Config(MegatronMixedPrecision, precision="32")))
    model, lora = peft_api._load_base_model_and_lora(Path(lora_checkpoint))
    model.config.bf16, model.config.params_dtype = False, torch.float32  # what merge_lora sets to bf16
    peft_api._setup_trainer_and_restore_model_and_adapter(Path(lora_checkpoint), trainer, model, lora)
    merged = LoRAMerge()(trainer.strategy.megatron_parallel)
    weights = {k: v for k, v in merged.sharded_state_dict().items() if ".adapter." not in k}
    peft_api._save_merged_weight(str(output), weights, model, trainer)

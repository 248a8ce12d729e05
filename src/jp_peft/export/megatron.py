"""The export stage of the Megatron backend (needs CUDA: NeMo loads its checkpoints on the GPU).

For a trained stage S: the last NeMo LoRA checkpoint -> S/hf_adapter (jp-peft's Qwen2 hf-peft
exporter), S/nemo_merged (NeMo's llm.peft.merge_lora) -> S/hf_merged (NeMo's "hf" exporter,
tied embeddings checked) and S/model.nemo, then S/metrics.json measured with the HF models.
"""

from __future__ import annotations

import json
from pathlib import Path

from jp_peft.spec import experiment_from_dict


def last_checkpoint(stage_dir: Path) -> Path:
    candidates = sorted((stage_dir / "checkpoints").glob("*-last"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"{stage_dir}/checkpoints: no *-last checkpoint; did the stage finish?")
    return candidates[-1]


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


def export_stage(spec: dict, stage: str) -> dict:
    from nemo.collections import llm

    from jp_peft.export.hf_peft import register_qwen2_hf_peft_exporter
    from jp_peft.export.nemo_archive import write_nemo_archive
    from jp_peft.stages import _write_json

    exp = experiment_from_dict(spec)
    stage_dir = exp.run_dir / stage
    ckpt = last_checkpoint(stage_dir)
    register_qwen2_hf_peft_exporter()
    # The adapter names the base the user configured (a hub id or a local HF directory), not NeMo's
    # guess from the checkpoint's import path: export checks and users load it from there.
    llm.export_ckpt(path=ckpt, target="hf-peft", output_path=stage_dir / "hf_adapter", overwrite=True,
                    base_model_name_or_path=exp.model.name)
    merged = stage_dir / "nemo_merged"
    llm.peft.merge_lora(lora_checkpoint_path=str(ckpt), output_path=str(merged))
    llm.export_ckpt(path=merged, target="hf", output_path=stage_dir / "hf_merged", overwrite=True)
    untied = fix_tied_embeddings(stage_dir / "hf_merged")
    archive = write_nemo_archive(merged, stage_dir / "model.nemo")
    result = {"checkpoint": str(ckpt), "hf_adapter": str(stage_dir / "hf_adapter"),
              "hf_merged": str(stage_dir / "hf_merged"), "nemo": archive, "untied_embeddings": untied}
    _write_json(stage_dir / "metrics.json", stage_metrics(exp, stage, stage_dir, ckpt))
    _write_json(stage_dir / "export_check.json", result | {"ok": True})
    return result


def stage_metrics(exp, stage: str, stage_dir: Path, ckpt: Path) -> dict:
    """metrics.json of a Megatron stage: JA/EN validation perplexity of the stage's starting model
    and of the exported merged model, measured the same way as on the hf backend."""
    import math
    import re

    from jp_peft.export.verify import validation_loss

    data = exp.stage(stage).data
    base = str(exp.run_dir / "cpt" / "hf_merged") if stage == "sft" and "cpt" in exp.stages else exp.model.name
    merged = str(stage_dir / "hf_merged")
    metrics = {"stage": stage, "backend": "megatron", "base_model": base, "checkpoint": str(ckpt),
               "hf_adapter": str(stage_dir / "hf_adapter"), "hf_merged": merged}
    step = re.search(r"step=(\d+)", ckpt.name)
    metrics["steps"] = int(step.group(1)) + 1 if step else None
    for lang in ("ja", "en"):
        for key, model in (("base_val", base), ("val", merged)):
            loss = validation_loss(model, getattr(data, f"val_{lang}"), data.seq_length)
            metrics[f"{key}_loss_{lang}"], metrics[f"{key}_ppl_{lang}"] = loss, math.exp(loss)
    return metrics

"""The base model a GPU run trains: Qwen2.5-0.5B's architecture (jp_peft.models.shapes) with random
weights, or a real checkpoint (--hf-model), written where the run's import stage reads it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def qwen25_05b_config():
    from jp_peft.models.shapes import QWEN25_05B_HF_CONFIG, hf_config

    return hf_config(QWEN25_05B_HF_CONFIG)


def _fresh(out: Path) -> Path:
    """A scratch directory beside `out`, renamed onto it once complete (a run stopped midway leaves no
    half-written model where the next run would take it for a finished one)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def write_random_base(out: Path, seed: int = 0) -> dict:
    """Qwen2.5-0.5B's architecture with random weights (jp_peft.models.real_shape.write_random_weights: bf16
    values stored as fp32, for the reason given there), saved with a Qwen2-compatible byte-level BPE tokenizer
    (jp_peft.tiny's: its ids are valid in the 152k vocabulary). Throughput does not depend on either:
    training runs bf16-mixed."""
    from jp_peft.models.real_shape import write_random_weights
    from jp_peft.tiny import build_tokenizer

    tmp = _fresh(out)
    tmp.mkdir(parents=True)
    build_tokenizer(tmp)
    write_random_weights(tmp, qwen25_05b_config(), seed)
    os.replace(tmp, out)
    return {"source": "random weights from Qwen2.5-0.5B's config (transformers init, seed 0)",
            "dtype": "float32 holding bf16 values",
            "tokenizer": "jp_peft.tiny byte-level BPE (Qwen2 pre-tokenizer and special tokens, 2,048 ids)"}


def copy_in_fp32(source: Path, out: Path) -> dict:
    """A real checkpoint, upcast to fp32 (lossless) for the reason write_random_base gives, with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = _fresh(out)
    model = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    os.replace(tmp, out)
    return {"source": str(source), "dtype": "float32 (upcast from the checkpoint's dtype, lossless)",
            "tokenizer": f"{source} (its own)"}

"""Qwen2.5-0.5B's exact architecture with seeded random weights and the real tokenizer, as a local HF directory.

The real-shape CPU tier (bench/real_shape_cpu.py, tests/integration/test_real_shape_pipeline.py) runs the whole
pipeline on it: every shape the real checkpoint has (152k vocabulary, tied embeddings, 24 layers, GQA 14/2),
nothing downloaded. Built once per cache directory and reused, like the tiny base (jp_peft.tiny):

    python -m jp_peft.models.real_shape        # builds it if needed, prints the directory
    python experiments/qwen_lora_ja.py --hf-model "$(python -m jp_peft.models.real_shape)" ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from jp_peft.models.shapes import QWEN25_05B_HF_CONFIG, QWEN25_05B_PARAMETERS
from jp_peft.tiny import cache_root

SEED = 0
# Bump when what the build writes changes (the key also hashes the config, the seed and the tokenizer's key).
BUILD_VERSION = "1"
STAMP = "jp_peft_base.json"
# The directory name starts like the hub id's last part so that NeMo's import path (local/<dir name>) says
# what it is.
PREFIX = "Qwen2.5-0.5B-random-"


def write_random_weights(out_dir: Path, config, seed: int = SEED) -> int:
    """Save a causal LM of `config` (a transformers config) with transformers' own init under `seed`, as
    safetensors; returns its parameter count (tied weights once).

    The weights are bf16 values, as in the real checkpoint (so a bf16 merge rounds only what LoRA added),
    stored as fp32: NeMo 2.7.3's importer without Transformer Engine fails on a bf16 source (io/state.py
    apply_transforms asserts on the dtypes of the local spec's norms). The GPU benchmark (bench/gpu/model.py)
    writes its random base with this too."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).to(torch.float32))
    model.save_pretrained(out_dir, safe_serialization=True)
    count = sum(p.numel() for p in model.parameters())
    del model
    return count


def _tokenizer_dir(log=print) -> Path:
    from jp_peft.models.qwen_tokenizer import ensure_qwen25_tokenizer

    return ensure_qwen25_tokenizer(log=log)


def _build_key(tokenizer_dir: Path) -> str:
    digest = hashlib.sha256(BUILD_VERSION.encode())
    digest.update(json.dumps([QWEN25_05B_HF_CONFIG, SEED, tokenizer_dir.name], sort_keys=True).encode())
    return digest.hexdigest()[:12]


def real_shape_path(log=print) -> Path:
    """Where the real-shape base of this checkout lives (built or not)."""
    return cache_root() / f"{PREFIX}{_build_key(_tokenizer_dir(log))}"


def ensure_real_shape_base(log=print) -> Path:
    """Directory of the cached real-shape base (config.json, model.safetensors, the Qwen2.5 tokenizer),
    building it if needed (about a minute and 2 GB on disk: fp32, tied embeddings stored once)."""
    import fcntl

    from jp_peft.models.shapes import hf_config

    tokenizer_dir = _tokenizer_dir(log)
    target = cache_root() / f"{PREFIX}{_build_key(tokenizer_dir)}"
    if (target / STAMP).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes starting at once build it once
        if (target / STAMP).exists():
            return target
        tmp = target.parent / f"{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        started = time.perf_counter()
        log(f"building Qwen2.5-0.5B's architecture with random weights in {target} (once; later runs reuse it)")
        for item in tokenizer_dir.iterdir():
            # the tokenizer's own stamp stays behind: STAMP here describes the model directory
            if item.is_file() and not item.name.startswith("jp_peft_"):
                shutil.copy2(item, tmp / item.name)
        params = write_random_weights(tmp, hf_config(QWEN25_05B_HF_CONFIG), SEED)
        if params != QWEN25_05B_PARAMETERS:  # the architecture is the point of this directory
            raise RuntimeError(f"built {params:,} parameters, Qwen2.5-0.5B has {QWEN25_05B_PARAMETERS:,}")
        info = {"what": "Qwen2.5-0.5B's architecture (jp_peft.models.shapes) with random weights "
                        f"(transformers init, seed {SEED}, bf16 values stored as fp32) and Qwen2.5's tokenizer "
                        f"({tokenizer_dir.name})", "params": params, "seed": SEED,
                "key": target.name.removeprefix(PREFIX), "seconds": round(time.perf_counter() - started, 1)}
        (tmp / STAMP).write_text(json.dumps(info, indent=1) + "\n")
        os.replace(tmp, target)
        log(f"real-shape base built in {info['seconds']} s: {params:,} parameters")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jp_peft.models.real_shape",
                                     description="Build (once) Qwen2.5-0.5B's architecture with seeded random "
                                                 "weights and the real tokenizer; print its directory.")
    parser.parse_args(argv)
    from jp_peft.models.qwen_tokenizer import TokenizerSourceError

    try:
        path = ensure_real_shape_base(log=lambda msg: print(msg, file=sys.stderr))
    except TokenizerSourceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

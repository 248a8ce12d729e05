"""Peak memory of QLoRA (model.quantization: nf4) against plain LoRA on the real-shape Qwen2.5-0.5B, on CPU.

    python bench/qlora_memory.py                 # both modes, one process each -> bench/results/qlora_memory_*.json
    python bench/qlora_memory.py --seq 256 --steps 2

The model is Qwen2.5-0.5B's architecture (jp_peft.models.shapes) with random weights, saved once in bf16 to a
temporary directory; each mode then runs in a fresh process, loads it the way the hf backend's stages do
(jp_peft.backends.hf.methods.build_model: fp32 for lora, 4-bit NF4 with double quantization for nf4), wraps
it in the spec's LoRA (r=32, alpha 16, the seven projections) and trains `--steps` AdamW steps on batch 1.
It reports the process's peak resident memory (ru_maxrss) after loading and after training, the model's
parameter bytes, and the step time. On CPU the peak RSS is what a user's machine needs; on a GPU the same
ratio shows in max_memory_allocated (the base's weights are 4-bit there too).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_model(directory: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from jp_peft.models.shapes import hf_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(), torch_dtype=torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)


def measure(model_dir: str, mode: str, seq: int, steps: int) -> dict:
    import torch

    from jp_peft.backends.hf.methods import build_model
    from jp_peft.spec import LoraSpec, ModelSpec

    torch.manual_seed(0)
    model_spec = ModelSpec(name=model_dir, quantization="nf4" if mode == "nf4" else None)
    started = time.perf_counter()
    model = build_model(model_dir, "lora", LoraSpec(), torch.float32, model_spec)
    load_s, after_load = time.perf_counter() - started, rss_mb()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 151_000, (1, seq), generator=torch.Generator().manual_seed(0))
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"mode": mode, "peak_rss_mb_after_load": after_load, "peak_rss_mb_after_training": rss_mb(),
            "parameter_mb": weight_bytes / 2**20, "trainable_params": sum(p.numel() for p in params),
            "load_seconds": load_s, "step_seconds": times, "losses": losses}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--mode", choices=("lora", "nf4"), help="(internal) one measurement in this process")
    parser.add_argument("--model-dir", help="(internal) the saved real-shape model")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.model_dir, args.mode, args.seq, args.steps)))
        return 0
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        save_model(Path(tmp))
        runs = []
        for mode in ("lora", "nf4"):
            proc = subprocess.run([sys.executable, __file__, "--mode", mode, "--model-dir", tmp, "--seq", str(args.seq),
                                   "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    lora, nf4 = runs
    import bitsandbytes
    import torch

    result = {"benchmark": "qlora_memory", "model": "Qwen2.5-0.5B architecture, random weights", "device": "cpu",
              "seq_length": args.seq, "batch": 1, "steps": args.steps, "lora": "r=32 alpha=16, seven projections",
              "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__, "runs": runs,
              "peak_rss_ratio_nf4_over_lora": nf4["peak_rss_mb_after_training"] / lora["peak_rss_mb_after_training"],
              "parameter_bytes_ratio_nf4_over_lora": nf4["parameter_mb"] / lora["parameter_mb"]}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"qlora_memory_{datetime.now(timezone.utc):%Y%m%d_%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for run in runs:
        print(f"{run['mode']:>4}: peak RSS {run['peak_rss_mb_after_training']:,.0f} MB (after load "
              f"{run['peak_rss_mb_after_load']:,.0f}), parameters {run['parameter_mb']:,.0f} MB, step "
              f"{sum(run['step_seconds']) / len(run['step_seconds']):.1f} s")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU training throughput of the hf backend, side by side in one process:

1. jp-peft's hf backend (Lightning, the real train_stage) vs a plain transformers + peft loop on
   the same tiny model, data, LoRA, batch and optimiser: tokens/s, and the ratio (>= 1.0 means
   no framework tax).
2. SFT with packing vs one example per row (padded): effective (non-padding) tokens/s.

    python bench/cpu_train_throughput.py [--steps 24] [--rounds 2] [--threads N]

Writes bench/results/cpu_train_throughput_*.json. Medians over steps after --warmup. The SFT rows' packing
density (real tokens per row, packed and one example per row) is recorded too: with every row padded to the
sequence length, both take the same time per step, so their ratio is what packed / padded should measure.
--threads sets torch's intra-op threads (default: torch's, one per core); on a machine that other torch
jobs share, 1 thread avoids the stalls of threads that wait for each other at every operator.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def make_spec(out: Path, steps: int, overrides: list[str]):
    from jp_peft.spec import resolve_spec
    from jp_peft.spec import load_preset

    return resolve_spec(load_preset("smoke"),
                        [f"output_dir={out}", "wandb.enabled=false", f"train.max_steps={steps}", "train.warmup_steps=2",
                         f"train.val_check_interval={steps}", "train.limit_val_batches=1",
                         f"train.ckpt_every_n_steps={steps}", *overrides])


def median_after(rows: list[dict], key: str, warmup: int) -> float:
    return statistics.median(r[key] for r in rows[warmup:])


def run_jp_peft(spec, stage: str, warmup: int, tag: str) -> dict:
    import shutil

    from jp_peft.backends.hf.trainer import train_stage
    from jp_peft.records import layout

    # Each measurement starts fresh, with no checkpoint to resume from
    stage_dir = layout.stage_dir(spec, stage)
    shutil.rmtree(stage_dir, ignore_errors=True)
    stage_dir.mkdir(parents=True)
    metrics, _, _ = train_stage(spec, stage, layout.base_model_dir(spec), [])
    rows = [json.loads(x) for x in open(layout.train_log(spec, stage))]
    return {"tokens_per_s": median_after(rows, "perf/tokens_per_s", warmup),
            "step_time_s": median_after(rows, "perf/step_time_s", warmup), "steps": len(rows)}


def run_plain_peft(spec, warmup: int) -> dict:
    """The baseline a user would write: transformers + peft, AdamW, micro-batch accumulation, clipping."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jp_peft.backends.hf.trainer import build_datasets
    from jp_peft.records.layout import base_model_dir

    torch.manual_seed(spec.cpt.train.seed)
    base = base_model_dir(spec)
    train_set, _ = build_datasets(spec, "cpt", AutoTokenizer.from_pretrained(base))
    lora = spec.lora
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32),
                           LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                      target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    model.train()
    train = spec.cpt.train
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train.lr)
    loader = DataLoader(train_set, batch_size=train.global_batch_size)
    rows = []
    for step, batch in enumerate(loader):
        if step >= train.max_steps:
            break
        started = time.perf_counter()
        for i in range(0, batch["input_ids"].shape[0], train.micro_batch_size):
            ids = batch["input_ids"][i:i + train.micro_batch_size]
            labels = batch["labels"][i:i + train.micro_batch_size]
            logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
            (loss * ids.shape[0] / batch["input_ids"].shape[0]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optim.step()
        optim.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        rows.append({"tokens_per_s": batch["input_ids"].numel() / seconds, "step_time_s": seconds})
    return {"tokens_per_s": median_after(rows, "tokens_per_s", warmup),
            "step_time_s": median_after(rows, "step_time_s", warmup), "steps": len(rows)}


def packing_density(spec) -> dict:
    """Real (non-padding) tokens per row of the SFT training set, packed and one example per row."""
    from transformers import AutoTokenizer

    from jp_peft.backends.hf.data import SFTDataset
    from jp_peft.records.layout import base_model_dir

    data = spec.sft.data
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir(spec))
    out = {}
    for name, packing in (("packed", True), ("padded", False)):
        dataset = SFTDataset(spec.sft.data.sft_train, tokenizer, data.seq_length, None, 0, packing,
                             tokenizer.pad_token_id or tokenizer.eos_token_id)
        out[name] = {"rows": len(dataset.rows), "real_tokens": dataset.real_tokens(),
                     "real_tokens_per_row": dataset.real_tokens() / len(dataset.rows)}
    out["ratio_packed_over_padded"] = out["packed"]["real_tokens_per_row"] / out["padded"]["real_tokens_per_row"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each configuration")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.threads:
        torch.set_num_threads(args.threads)

    from jp_peft.run.entry import run_data, run_import

    out = Path(tempfile.mkdtemp(prefix="bench_cpu_"))
    spec = make_spec(out, args.steps, ["lora.dropout=0.0"])
    run_import(spec)
    run_data(spec)
    packed = make_spec(out, args.steps, ["lora.dropout=0.0", "sft.data.packing=true", "stages=[sft]"])
    padded = make_spec(out, args.steps, ["lora.dropout=0.0", "sft.data.packing=false", "stages=[sft]"])

    density = packing_density(packed)
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"jp_peft_hf_backend": [], "plain_transformers_peft": [], "sft_packed": [],
                                   "sft_padded": []}
    for r in range(args.rounds):
        runs["jp_peft_hf_backend"].append(run_jp_peft(spec, "cpt", args.warmup, f"r{r}"))
        runs["plain_transformers_peft"].append(run_plain_peft(spec, args.warmup))
        runs["sft_packed"].append(run_jp_peft(packed, "sft", args.warmup, f"packed{r}"))
        runs["sft_padded"].append(run_jp_peft(padded, "sft", args.warmup, f"padded{r}"))
    summary = {name: statistics.median(x["tokens_per_s"] for x in values) for name, values in runs.items()}
    result = {
        "benchmark": "cpu_train_throughput",
        "model": "embedded tiny Qwen2 (jp_peft.tiny)", "lora": {"rank": spec.lora.rank, "targets": list(spec.lora.target_modules)},
        "seq_length": spec.cpt.data.seq_length, "global_batch": spec.cpt.train.global_batch_size,
        "micro_batch": spec.cpt.train.micro_batch_size, "steps": args.steps, "warmup": args.warmup,
        "rounds": args.rounds, "runs": runs, "median_tokens_per_s": summary,
        "ratio_jp_peft_over_plain": summary["jp_peft_hf_backend"] / summary["plain_transformers_peft"],
        # Each round runs both back to back: the spread of these shows how much is machine noise.
        "ratio_jp_peft_over_plain_per_round": [a["tokens_per_s"] / b["tokens_per_s"] for a, b in
                                               zip(runs["jp_peft_hf_backend"], runs["plain_transformers_peft"])],
        "ratio_packed_over_padded_effective_tokens": summary["sft_packed"] / summary["sft_padded"],
        "ratio_packed_over_padded_per_round": [a["tokens_per_s"] / b["tokens_per_s"] for a, b in
                                               zip(runs["sft_packed"], runs["sft_padded"])],
        "sft_packing_density": density,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__, "load_average_before": load_before,
                    "load_average_after": os.getloadavg()},
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"cpu_train_throughput_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for name, value in summary.items():
        print(f"{name:26s} {value:10.1f} tokens/s")
    print(f"jp-peft / plain = {result['ratio_jp_peft_over_plain']:.3f}; packed / padded = "
          f"{result['ratio_packed_over_padded_effective_tokens']:.3f} (packing density ratio "
          f"{density['ratio_packed_over_padded']:.3f}) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

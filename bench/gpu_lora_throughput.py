"""LoRA training throughput on one GPU, side by side in one run, and NeMo-vs-Hugging Face parity.

Three configurations train Qwen2.5-0.5B's exact architecture (random weights from its config, or a
real checkpoint with --hf-model) with LoRA rank 32 on all seven linear projections, bf16, on blocks of
the bundled Japanese corpus, each at every micro batch of a sweep until one does not fit:
  megatron       jp-peft's Megatron backend: the composed recipe (src/jp_peft/recipes/qwen25_500m_ja.py cpt_lora)
                 run by jp-peft's stage runner (jp_peft.run.entry.run_stage), under torchrun
  hf_backend     jp-peft's hf backend (backends/hf/stages.py train: transformers + peft + Lightning)
  plain_hf_peft  a plain transformers + peft loop: bf16 weights, sdpa attention, AdamW
Then the parity run (Megatron at its best micro batch, --parity-steps long) goes through the run's own
export stage, and a CPU fp32 check loads its adapter with HF+PEFT and compares logits with NeMo's on 32
Japanese prompts, and exports the imported base back to HF ("hf") to compare the weights.

On a GPU (one H100/H200; ~8 minutes with the defaults; later sweep points are skipped, and say so,
when --time-budget would be exceeded):
    python bench/gpu_lora_throughput.py                        # seq 2048, micro batches 4 8 16
    python bench/gpu_lora_throughput.py --seq 2048 4096 --time-budget 900
    python bench/gpu_lora_throughput.py --hf-model /models/Qwen2.5-0.5B
    python bench/report.py                                     # renders BENCHMARKS.md's GPU table
On CPU, every configuration for a few steps on the embedded tiny Qwen2 (NeMo's CPU path; the results
are marked tiny-cpu and never rendered into the GPU table; tests/bench runs this):
    python bench/gpu_lora_throughput.py --tiny
What would run, without running it:
    python bench/gpu_lora_throughput.py --dryrun

The environment step stops at once, naming what is missing, where the NeMo stack is not installed for
the interpreter that runs this (pyproject.toml pins it: nemo_toolkit 2.7.3, megatron-core 0.15, nemo_run,
transformers 4.57): the H200 image the device tool lends has torch, transformers 5, peft and lightning but
none of NeMo, megatron-core or nemo_run, which must be carried there first (the tool's README: wheels).

Writes bench/results/gpu_lora_throughput_<mode>_<time>.json (--results), rewritten after every
step so that a run stopped early still leaves what it measured; RESULT_FIELDS lists its fields.
Every trial runs in its own process (its own peak memory; an out-of-memory ends only that trial).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # runs from a checkout without `pip install -e .`
    sys.path[:0] = [str(REPO / "src"), str(REPO)]

CONFIGS = ("megatron", "hf_backend", "plain_hf_peft")
# Qwen2.5-0.5B's config.json as shipped (Qwen/Qwen2.5-0.5B), less the fields transformers fills itself.
QWEN25_05B_HF_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "hidden_act": "silu", "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "initializer_range": 0.02, "attention_dropout": 0.0, "use_sliding_window": False,
    "sliding_window": 32768, "max_window_layers": 24, "bos_token_id": 151643, "eos_token_id": 151643,
}
# Parameters of Qwen2.5-0.5B, tied embeddings counted once: 151936*896 (embedding) + 24 layers x
# (q 896*896+896, k and v 896*128+128 each, o 896*896, gate/up/down 3*896*4864, 2 norms 2*896) + 896.
QWEN25_05B_PARAMETERS = 494_032_768
TARGETS = {"megatron_tokens_per_s_per_gpu": 120_000, "megatron_seq_length": 2048, "megatron_over_plain": 3.0}
# The documented top-level fields of a results file (tests/bench checks every one is written).
RESULT_FIELDS = ("benchmark", "mode", "complete", "failed_step", "error", "command", "started", "written",
                 "wall_seconds", "machine", "versions", "model", "workload", "configurations", "ratios", "targets",
                 "parity", "steps")
TRIAL_FIELDS = ("config", "seq_length", "micro_batch", "global_batch", "status", "steps", "measured_steps",
                "tokens_per_s", "tflops_per_s", "mfu", "peak_memory_mb", "step_time_s", "wall_seconds", "log")
# Seconds the export stage and the CPU parity checks take on the 0.5B model (an estimate that keeps time
# for them in the budget; the first GPU run's `steps` records the real ones).
PARITY_CHECKS_S = 180.0
OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "CUBLAS_STATUS_ALLOC_FAILED", "out of memory")


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message names it."""


# --- statistics and FLOP accounting -------------------------------------------------------------

def percentile(values, q: float) -> float:
    """The q-th percentile (0..100), linear between order statistics (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def step_time_spread(seconds) -> dict:
    """Median, p10, p90, min, max of step times, and (p90 - p10) / median: the run-to-run noise."""
    median = percentile(seconds, 50)
    p10, p90 = percentile(seconds, 10), percentile(seconds, 90)
    return {"median": median, "p10": p10, "p90": p90, "min": min(seconds), "max": max(seconds),
            "relative_spread": (p90 - p10) / median if median else None}


def peak_tflops_for(gpu_name: str | None) -> float | None:
    """Dense bf16 peak of a device by name (jp_peft.training.flops.PEAK_TFLOPS_BF16); JP_PEFT_PEAK_TFLOPS wins."""
    from jp_peft.training.flops import PEAK_TFLOPS_BF16

    if os.environ.get("JP_PEFT_PEAK_TFLOPS"):
        return float(os.environ["JP_PEFT_PEAK_TFLOPS"])
    for key, value in PEAK_TFLOPS_BF16.items():
        if gpu_name and key in gpu_name:
            return value
    return None


def throughput(rows: list[dict], warmup: int, flops_per_token: float, peak: float | None) -> dict:
    """tokens/s (median of the steps after `warmup`), TFLOP/s, MFU, peak memory, step-time spread from
    train_log.jsonl rows (perf/tokens_per_s, perf/step_time_s, perf/peak_memory_mb)."""
    steps = [r for r in rows if "perf/tokens_per_s" in r]
    measured = steps[warmup:]
    if len(measured) < 2:
        raise BenchError(f"{len(steps)} logged steps, fewer than warm-up {warmup} + 2 to measure")
    tokens_per_s = statistics.median(r["perf/tokens_per_s"] for r in measured)
    tflops = tokens_per_s * flops_per_token / 1e12
    memory = [r["perf/peak_memory_mb"] for r in steps if r.get("perf/peak_memory_mb") is not None]
    return {"steps": len(steps), "measured_steps": len(measured), "tokens_per_s": tokens_per_s,
            "tflops_per_s": tflops, "mfu": tflops / peak if peak else None,
            "peak_memory_mb": max(memory) if memory else None,
            "step_time_s": step_time_spread([r["perf/step_time_s"] for r in measured])}


def is_oom(log_text: str) -> bool:
    return any(marker in log_text for marker in OOM_MARKERS)


def logit_agreement(a, b) -> dict:
    """max |a - b|, mean KL(softmax a || softmax b) over positions (float64), share of equal argmax."""
    import torch

    a64, b64 = a.double(), b.double()
    log_p, log_q = torch.log_softmax(a64, -1), torch.log_softmax(b64, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {"max_abs_diff": float((a64 - b64).abs().max()), "mean_kl": float(kl.mean()),
            "max_kl": float(kl.max()), "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).double().mean()),
            "positions": int(kl.numel())}


# --- machine, versions, environment -------------------------------------------------------------

def gpu_info() -> dict:
    """nvidia-smi's name, driver and memory of GPU 0; {} without a GPU."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60, check=True).stdout.strip().splitlines()
    except (subprocess.SubprocessError, OSError):
        return {}
    if not out:
        return {}
    name, driver, memory = [x.strip() for x in out[0].split(",")]
    return {"gpu": name, "driver": driver, "gpu_memory": memory, "gpu_count": len(out)}


def versions() -> dict:
    from importlib import metadata

    found = {}
    for name in ("torch", "nemo_toolkit", "megatron-core", "transformer_engine", "transformers", "peft", "lightning",
                 "nemo_run", "numpy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    try:
        found["jp_peft_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                                 timeout=30).stdout.strip() or None
    except OSError:
        found["jp_peft_commit"] = None
    # a copy of the tree without .git (the device tool's) says which commit it is through the environment
    found["jp_peft_commit"] = found["jp_peft_commit"] or os.environ.get("JP_PEFT_COMMIT")
    return found


# What each configuration imports (module -> distribution), checked before anything runs.
NEEDED = {
    "megatron": {"nemo": "nemo_toolkit", "megatron.core": "megatron-core", "nemo_run": "nemo_run", "fiddle": "fiddle",
                 "lightning": "lightning", "transformers": "transformers", "peft": "peft"},
    "hf_backend": {"megatron.core": "megatron-core", "lightning": "lightning", "transformers": "transformers",
                   "peft": "peft"},
    "plain_hf_peft": {"megatron.core": "megatron-core", "transformers": "transformers", "peft": "peft"},
}


def missing_modules(configs) -> list[str]:
    import importlib.util

    missing = set()
    for config in configs:
        for module, dist in NEEDED[config].items():
            try:
                if importlib.util.find_spec(module) is None:
                    missing.add(dist)
            except ModuleNotFoundError:
                missing.add(dist)
    return sorted(missing)


# --- the base model ----------------------------------------------------------------------------

def qwen25_05b_config():
    from transformers import Qwen2Config

    values = {k: v for k, v in QWEN25_05B_HF_CONFIG.items() if k not in ("architectures", "model_type")}
    return Qwen2Config(**values, torch_dtype="float32")


def parameter_count(config) -> int:
    """Parameters of the causal LM built from `config` on the meta device (tied weights once)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def write_random_base(out: Path, seed: int = 0) -> dict:
    """Qwen2.5-0.5B's architecture with random weights (transformers' own init), saved with a
    Qwen2-compatible byte-level BPE tokenizer (jp_peft.tiny's: its ids are valid in the 152k vocabulary).
    The weights are bf16 values, as in the real checkpoint (so a bf16 merge rounds only what LoRA added),
    stored as fp32: NeMo 2.7.3's importer without Transformer Engine fails on a bf16 source (io/state.py
    apply_transforms asserts on the dtypes of the local spec's norms). Throughput does not depend on
    either: training runs bf16-mixed."""
    import torch
    from transformers import AutoModelForCausalLM

    from jp_peft.tiny import build_tokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build_tokenizer(tmp)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(qwen25_05b_config(), torch_dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).to(torch.float32))
    model.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, out)
    return {"source": "random weights from Qwen2.5-0.5B's config (transformers init, seed 0)",
            "dtype": "float32 holding bf16 values",
            "tokenizer": "jp_peft.tiny byte-level BPE (Qwen2 pre-tokenizer and special tokens, 2,048 ids)"}


def copy_in_fp32(source: Path, out: Path) -> dict:
    """A real checkpoint, upcast to fp32 (lossless) for the reason write_random_base gives, with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    os.replace(tmp, out)
    return {"source": str(source), "dtype": "float32 (upcast from the checkpoint's dtype, lossless)",
            "tokenizer": f"{source} (its own)"}


# --- specs and trials --------------------------------------------------------------------------

def trial_overrides(args, base: Path | None, name: str, backend: str, seq: int, micro: int, steps: int) -> list[str]:
    """The spec of one trial: the production preset (or the smoke preset with --tiny), one CPT stage."""
    global_batch = max(args.global_batch, micro)
    overrides = [f"output_dir={args.work_dir / 'runs'}", f"name={name}", "group=bench", f"backend={backend}",
                 "stages=[import,data,cpt,export]", "wandb.enabled=false", f"cpt.data.seq_length={seq}",
                 f"cpt.train.micro_batch_size={micro}", f"cpt.train.global_batch_size={global_batch}",
                 f"cpt.train.max_steps={steps}", f"cpt.train.warmup_steps={min(args.warmup, steps - 1)}",
                 f"cpt.train.val_check_interval={steps}", "cpt.train.limit_val_batches=1",
                 f"cpt.train.ckpt_every_n_steps={steps}", f"lora.rank={args.rank}"]
    if args.tiny:
        overrides += ["cluster.accelerator=cpu"]
    else:
        overrides += [f"model.name={base}", "model.tiny=false"]
    return overrides


def trial_spec(args, base, name, backend, seq, micro, steps):
    from jp_peft.spec import resolve_spec
    from jp_peft.spec import load_preset

    preset = REPO / "recipes" / "configs" / ("smoke.yaml" if args.tiny else "qwen25_500m_ja.yaml")
    return resolve_spec(load_preset(preset), trial_overrides(args, base, name, backend, seq, micro, steps), cwd=REPO)


def trial_name(config: str, seq: int, micro: int) -> str:
    return f"{config.replace('_', '-')}-s{seq}-mb{micro}"


# --- workers: each runs in its own process ------------------------------------------------------

def worker_main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    started = time.perf_counter()
    if job["kind"] == "stage":
        result = run_stage_job(job)
    elif job["kind"] == "base":
        result = run_base_job(job)
    elif job["kind"] == "plain":
        result = run_plain_job(job)
    elif job["kind"] == "parity":
        result = run_parity_job(job)
    else:
        raise ValueError(f"unknown worker kind {job['kind']!r}")
    result["wall_seconds"] = time.perf_counter() - started
    Path(job["result"]).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def run_stage_job(job: dict) -> dict:
    """One jp-peft stage exactly as its NeMo-Run task runs it: `task_config(...)` built and called
    (Megatron: run_stage with the recipe module's composed NeMo recipe; hf: run_stage)."""
    from jp_peft.run.plan import PlannedTask, task_config
    from jp_peft.spec import experiment_from_dict

    spec = experiment_from_dict(job["spec"])
    task = PlannedTask(f"{spec.name}-{job['stage']}", job["stage"], spec, [], target=job.get("target"))
    if spec.backend != "megatron":
        from jp_peft.run.entry import run_stage

        run_stage(spec.to_dict(), task.stage, task.target)
        return {"recipe_adjustments": []}
    import fiddle as fdl

    from recipes import qwen25_500m_ja

    config = task_config(task, qwen25_500m_ja)
    adjustments = adjust_recipe_for_this_machine(config)
    fdl.build(config)()
    return {"recipe_adjustments": adjustments}


def adjust_recipe_for_this_machine(config) -> list[str]:
    """On a GPU without Apex's/Megatron's compiled fused-softmax kernel (any machine without NVIDIA's NeMo
    container), bf16 attention with masked_softmax_fusion imports `scaled_masked_softmax_cuda`
    (megatron/core/fusions/fused_softmax.py:357) and fails on the first forward: use the unfused softmax,
    as backends/megatron/compose.use_cpu does on CPU. Returns what was changed (recorded in the results)."""
    import importlib.util

    import torch

    recipe = getattr(config, "recipe", None)
    model = getattr(recipe, "model", None) if recipe is not None else None
    if model is None or not torch.cuda.is_available() or not hasattr(model, "config"):
        return []
    if importlib.util.find_spec("scaled_masked_softmax_cuda") is not None:
        return []
    if getattr(model.config, "masked_softmax_fusion", None) is False:
        return []
    model.config.masked_softmax_fusion = False
    return ["model.config.masked_softmax_fusion=False (no compiled scaled_masked_softmax_cuda kernel here)"]


def run_base_job(job: dict) -> dict:
    out = Path(job["out"])
    if job.get("source"):
        info = copy_in_fp32(Path(job["source"]), out)
    else:
        info = write_random_base(out)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    return {**info, "parameters": parameter_count(config), "hf_config": config.to_diff_dict()}


def run_plain_job(job: dict) -> dict:
    """The baseline a user writes: transformers + peft, bf16 weights on a GPU (fp32 on CPU), sdpa,
    AdamW on the LoRA weights, gradient accumulation over micro batches, clipping; the same token
    blocks as the hf backend (jp_peft.backends.hf.data.BlendedBlocks over the prepared files)."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    from jp_peft.backends.hf.data import BlendedBlocks
    from jp_peft.training.step_metrics import peak_memory_mb
    from jp_peft.spec import experiment_from_dict

    spec = experiment_from_dict(job["spec"])
    data, train, lora = spec.cpt.data, spec.cpt.train, spec.lora
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(train.seed)
    model = AutoModelForCausalLM.from_pretrained(job["base"], torch_dtype=dtype, attn_implementation="sdpa").to(device)
    model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=train.lr, fused=cuda)
    blocks = BlendedBlocks([b.prefix for b in data.blend], data.blend_weights(), data.seq_length,
                           train.max_steps * train.global_batch_size, train.seed)
    loader = iter(DataLoader(blocks, batch_size=train.micro_batch_size, num_workers=2 if cuda else 0,
                             pin_memory=cuda))
    accumulation = train.global_batch_size // train.micro_batch_size
    log = Path(job["log"])
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as handle:
        for step in range(1, train.max_steps + 1):
            started = time.perf_counter()
            total = 0.0
            for _ in range(accumulation):
                batch = next(loader)
                ids, labels = batch["input_ids"].to(device, non_blocking=True), batch["labels"].to(device, non_blocking=True)
                logits = model(input_ids=ids).logits
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1)) / accumulation
                loss.backward()
                total += loss.detach()
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
            optim.step()
            optim.zero_grad(set_to_none=True)
            loss_value = float(total)  # waits for the step
            seconds = time.perf_counter() - started
            row = {"trainer/global_step": step, "train/loss": loss_value, "perf/step_time_s": seconds,
                   "perf/tokens_per_s": train.global_batch_size * data.seq_length / seconds,
                   "perf/peak_memory_mb": peak_memory_mb()}
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            if step % 10 == 0 or step == train.max_steps:
                print(f"[jp-peft] plain step {step}/{train.max_steps} loss {loss_value:.4f} "
                      f"{row['perf/tokens_per_s']:,.0f} tok/s", flush=True)
    return {}


def japanese_prompts(tokenizer_dir: str, n: int, length: int):
    """The first `n` documents of data/ja/cpt.validation.jsonl that have >= `length` tokens, cut to `length`."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = []
    for line in (REPO / "data" / "ja" / "cpt.validation.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            ids = tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            if len(ids) >= length:
                rows.append(ids[:length])
        if len(rows) == n:
            return torch.tensor(rows)
    raise BenchError(f"parity: only {len(rows)} validation documents have >= {length} tokens; lower --prompt-tokens")


def run_parity_job(job: dict) -> dict:
    """On CPU in fp32 (CUDA hidden; NeMo's CPU path): the trained LoRA checkpoint merged in fp32 through
    NeMo's own merge pieces, its Megatron forward vs the exported adapter on its base through HF+PEFT on
    32 Japanese prompts; and the imported base exported back to HF ("hf") vs the original weights."""
    from nemo.collections import llm

    from jp_peft.records import layout as rundir
    from jp_peft.backends.megatron import cpu as megatron_cpu
    from jp_peft.backends.megatron.compose import imported_base_path
    from jp_peft.backends.megatron.stages import last_checkpoint
    from jp_peft.export import parity
    from jp_peft.backends.megatron.merge import merge_lora
    from jp_peft.spec import experiment_from_dict

    megatron_cpu.enable()
    spec = experiment_from_dict(job["spec"])
    out = Path(job["out"])
    ids = japanese_prompts(rundir.base_model_dir(spec), job["prompts"], job["prompt_tokens"])
    nemo_form = "NeMo LoRA checkpoint merged in fp32 (jp_peft.backends.megatron.merge.merge_lora fp32=True), Megatron forward"
    if spec.cpt.train.precision.startswith(("bf16", "16")):
        merged = out / "nemo_merged_fp32"
        try:
            merge_lora(last_checkpoint(rundir.checkpoints(spec, "cpt")), merged, fp32=True)
        except Exception as exc:  # keep the numbers, say which form they are of
            merged = rundir.nemo_merged(spec, "cpt")
            nemo_form = (f"the export stage's bf16 merge_lora result (the fp32 merge failed: {type(exc).__name__}: "
                         f"{exc}), Megatron forward")
    else:  # an fp32 run's export stage already merged in fp32
        merged = rundir.nemo_merged(spec, "cpt")
    nemo = parity.nemo_logits(merged, ids)
    peft = parity.peft_logits(rundir.hf_adapter(spec, "cpt"), ids)
    result = {"nemo_vs_peft": {**logit_agreement(nemo, peft), "nemo_form": nemo_form,
                               "peft_form": "hf_adapter on the base its adapter_config names, transformers+peft, fp32"},
              "prompts": int(ids.shape[0]), "prompt_tokens": int(ids.shape[1])}
    del nemo, peft
    roundtrip = out / "hf_roundtrip"
    llm.export_ckpt(path=imported_base_path(spec), target="hf", output_path=roundtrip, overwrite=True)
    result["round_trip"] = compare_weights(Path(rundir.base_model_dir(spec)), roundtrip)
    return result


def compare_weights(base_dir: Path, other_dir: Path) -> dict:
    """max |difference| per tensor between two HF safetensors directories. A tied base stores no
    lm_head: an exported lm_head is compared with the base's embedding."""
    from safetensors import safe_open

    def tensors(directory: Path) -> dict:
        found = {}
        for shard in sorted(directory.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as handle:
                for key in handle.keys():
                    found[key] = handle.get_tensor(key)
        return found

    base, other = tensors(base_dir), tensors(other_dir)
    if "lm_head.weight" not in base and "lm_head.weight" in other and "model.embed_tokens.weight" in base:
        base["lm_head.weight"] = base["model.embed_tokens.weight"]
    per_tensor, shape_mismatch = {}, []
    for key in sorted(set(base) & set(other)):
        if base[key].shape != other[key].shape:
            shape_mismatch.append(key)
        else:
            per_tensor[key] = float((base[key].double() - other[key].double()).abs().max())
    return {"max_abs_diff": max(per_tensor.values()) if per_tensor else None, "tensors_compared": len(per_tensor),
            "shape_mismatch": shape_mismatch, "only_in_base": sorted(set(base) - set(other)),
            "only_in_export": sorted(set(other) - set(base)), "per_tensor": per_tensor}


# --- the parent: steps, trials, results --------------------------------------------------------

class Bench:
    """Runs the steps in order, each worker in its own process; rewrites the results file after every step."""

    def __init__(self, args, argv: list[str]):
        self.args = args
        self.started = time.perf_counter()
        mode = "tiny-cpu" if args.tiny else "gpu"
        stamp = time.strftime("%Y%m%d_%H%M%S")
        self.path = args.results / f"gpu_lora_throughput_{mode}_{stamp}.json"
        self.result = {
            "benchmark": "gpu_lora_throughput", "mode": mode, "complete": False, "failed_step": None, "error": None,
            "command": shlex.join(["python", "bench/gpu_lora_throughput.py", *argv]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "written": None, "wall_seconds": 0.0,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        **gpu_info()},
            "versions": versions(), "model": {}, "workload": {},
            "configurations": {c: {"trials": [], "best": {}} for c in args.configs},
            "ratios": {}, "targets": None, "parity": None, "steps": [],
        }
        self.peak = peak_tflops_for(self.result["machine"].get("gpu")) if not args.tiny else None
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO),
                                                                 os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                    "NEMO_HOME": str(args.work_dir / "nemo_home"), "WANDB_MODE": "disabled",
                    "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        self.base: Path | None = None
        self.flops: dict[int, float] = {}
        self.last_wall: dict[str, float] = {}  # seconds of each configuration's last trial

    # progress and results ------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def say(self, message: str) -> None:
        seconds = int(self.elapsed())
        print(f"[bench {seconds // 60}:{seconds % 60:02d}] {message}", flush=True)

    def write(self) -> None:
        self.result["written"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.result["wall_seconds"] = self.elapsed()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def step_done(self, name: str, started: float, **extra) -> None:
        self.result["steps"].append({"step": name, "seconds": time.perf_counter() - started, **extra})
        self.write()

    # workers --------------------------------------------------------------------------------
    def worker(self, step: str, job: dict, torchrun: bool = False, hide_cuda: bool = False,
               oom_ok: bool = False) -> dict | None:
        """Run one job in its own process; its output goes to a log (progress lines are echoed).
        Returns its result, or None for an out-of-memory when `oom_ok`; raises BenchError otherwise."""
        jobs = self.args.work_dir / "jobs"
        jobs.mkdir(parents=True, exist_ok=True)
        slug = step.replace(" ", "_").replace("/", "_")
        job_path, log_path = jobs / f"{slug}.json", jobs / f"{slug}.log"
        job = {**job, "result": str(jobs / f"{slug}.result.json")}
        job_path.write_text(json.dumps(job, indent=1))
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"] \
            if torchrun else [sys.executable]
        env = {**self.env, **({"CUDA_VISIBLE_DEVICES": ""} if hide_cuda else {})}
        started = time.perf_counter()
        with open(log_path, "w", encoding="utf-8") as log:
            # its own session: a timeout or Ctrl-C ends torchrun and the trainer it started, together
            proc = subprocess.Popen([*launcher, str(Path(__file__).resolve()), "--worker", str(job_path)], cwd=REPO,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    start_new_session=True)

            def pump() -> None:
                for line in proc.stdout:
                    log.write(line)
                    if echo(line):
                        print(f"    {line.rstrip()}", flush=True)

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                code = proc.wait(timeout=self.args.worker_timeout)
            except subprocess.TimeoutExpired:
                code = f"nothing (killed after --worker-timeout {self.args.worker_timeout:.0f} s)"
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            reader.join(timeout=30)
        text = log_path.read_text(encoding="utf-8", errors="replace")
        if code == 0 and Path(job["result"]).exists():
            return json.loads(Path(job["result"]).read_text())
        if oom_ok and is_oom(text):
            self.say(f"{step}: out of GPU memory (log {log_path})")
            return None
        tail = "\n".join(text.splitlines()[-60:])
        raise BenchError(f"{step}: worker exited {code}; log {log_path}; its last lines:\n{tail}")

    # steps ----------------------------------------------------------------------------------
    def check_environment(self) -> None:
        missing = missing_modules(self.args.configs)
        if missing:
            raise BenchError(f"these packages are not installed for {sys.executable}: {', '.join(missing)} "
                             f"(needed by {', '.join(self.args.configs)}; see this script's docstring)")
        if not self.args.tiny:
            import torch

            if not torch.cuda.is_available():
                raise BenchError("no CUDA device: the GPU benchmark needs one (use --tiny on CPU)")

    def prepare_base(self) -> None:
        if self.args.tiny:
            from jp_peft.tiny import ensure_tiny_base
            from transformers import AutoConfig

            self.base = ensure_tiny_base(log=self.say)
            config = AutoConfig.from_pretrained(self.base)
            self.result["model"] = {"source": "embedded tiny Qwen2 (jp_peft.tiny)", "dir": str(self.base),
                                    "dtype": "float32", "parameters": parameter_count(config),
                                    "hf_config": config.to_diff_dict(), "tokenizer": "jp_peft.tiny byte-level BPE"}
            return
        self.base = self.args.work_dir / ("hf_model_fp32" if self.args.hf_model else "qwen2.5-0.5b-random")
        info = self.worker("base", {"kind": "base", "out": str(self.base),
                                    "source": str(self.args.hf_model) if self.args.hf_model else None})
        info.pop("wall_seconds", None)
        self.result["model"] = {**info, "dir": str(self.base)}

    def shared_stages(self) -> None:
        """import (HF -> NeMo checkpoint, with its HF-vs-NeMo logits check) and data, shared by every trial."""
        backend = "megatron" if "megatron" in self.args.configs else "hf"
        seq, micro = self.args.seq[0], self.args.micro_batches[0]
        spec = trial_spec(self.args, self.base, "shared", backend, seq, micro, 2)
        for stage in ("import", "data"):
            started = time.perf_counter()
            self.say(f"stage {stage} ({backend} backend)")
            self.worker(stage, {"kind": "stage", "spec": spec.to_dict(), "stage": stage})
            self.step_done(stage, started)
        from jp_peft.records import layout as rundir

        record = json.loads(rundir.import_record(spec).read_text())
        self.result["model"]["import_checks"] = record.get("parity", [])

    def describe_workload(self) -> None:
        from transformers import AutoConfig

        from jp_peft.training.flops import lora_flops_per_token, shape_of_hf_config

        spec = trial_spec(self.args, self.base, "describe", "hf", self.args.seq[0], self.args.micro_batches[0], 2)
        shape = shape_of_hf_config(AutoConfig.from_pretrained(self.base))
        self.flops = {s: lora_flops_per_token(shape, s, spec.lora.rank, spec.lora.target_modules) for s in self.args.seq}
        self.result["workload"] = {
            "lora": {"rank": spec.lora.rank, "alpha": spec.lora.alpha, "dropout": spec.lora.dropout,
                     "targets": list(spec.lora.target_modules)},
            "precision": spec.cpt.train.precision, "data": "bundled Japanese/English CPT blend (data/blends/ja90_en10.yaml)",
            "seq_lengths": self.args.seq, "micro_batches": self.args.micro_batches,
            "global_batch": self.args.global_batch, "steps": self.args.steps, "warmup": self.args.warmup,
            "parity_steps": self.args.parity_steps, "time_budget_s": self.args.time_budget,
            "flops_per_token": {str(s): f for s, f in self.flops.items()}, "peak_tflops": self.peak,
            "flops_accounting": "jp_peft.training.flops.lora_flops_per_token (frozen 4N, LoRA 6N, attention)",
            "tokens_per_s": "median of the steps after warm-up; tokens = global batch x seq length per optimizer step",
            "memory": "torch.cuda.max_memory_allocated" if not self.args.tiny else "process max RSS (CPU)",
        }
        self.write()

    def trial(self, config: str, seq: int, micro: int, steps: int, parity_run: bool = False,
              name: str | None = None) -> dict:
        name = name or trial_name(config, seq, micro)
        step = f"{config} seq {seq} micro {micro}" + (" (parity run)" if parity_run else "")
        backend = {"megatron": "megatron", "hf_backend": "hf", "plain_hf_peft": "hf"}[config]
        spec = trial_spec(self.args, self.base, name, backend, seq, micro, steps)
        from jp_peft.records import layout as rundir

        log = rundir.train_log(spec, "cpt")
        if spec.run_dir.exists():
            shutil.rmtree(spec.run_dir)
        self.say(f"{step}: {steps} steps, global batch {spec.cpt.train.global_batch_size}")
        started = time.perf_counter()
        if config == "plain_hf_peft":
            job = {"kind": "plain", "spec": spec.to_dict(), "base": str(self.base), "log": str(log)}
        else:
            job = {"kind": "stage", "spec": spec.to_dict(), "stage": "cpt"}
        done = self.worker(step, job, torchrun=(config == "megatron"), oom_ok=not parity_run)
        record = {"config": config, "seq_length": seq, "micro_batch": micro,
                  "global_batch": spec.cpt.train.global_batch_size, "wall_seconds": time.perf_counter() - started,
                  "log": str(log), "parity_run": parity_run}
        if done is None:
            record.update(status="oom")
        else:
            rows = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines() if x.strip()]
            record.update(status="ok", **throughput(rows, self.args.warmup, self.flops[seq], self.peak),
                          recipe_adjustments=done.get("recipe_adjustments", []))
            self.say(f"{step}: {record['tokens_per_s']:,.0f} tokens/s, step {record['step_time_s']['median']:.3f} s"
                     + (f", MFU {record['mfu']:.1%}" if record["mfu"] is not None else "")
                     + (f", peak {record['peak_memory_mb'] / 1024:.1f} GiB" if record["peak_memory_mb"] else ""))
        if config == "hf_backend":  # a 2 GB merged copy per trial is not needed for throughput
            shutil.rmtree(rundir.hf_merged(spec, "cpt"), ignore_errors=True)
        self.add_trial(record)
        self.step_done(step, started, status=record["status"])
        return record

    def add_trial(self, record: dict) -> None:
        entry = self.result["configurations"][record["config"]]
        entry["trials"].append(record)
        ok = [t for t in entry["trials"] if t["status"] == "ok" and t["seq_length"] == record["seq_length"]]
        if ok:
            entry["best"][str(record["seq_length"])] = max(ok, key=lambda t: t["tokens_per_s"])
        self.update_ratios()

    def skipped(self, config: str, seq: int, micro: int, reason: str) -> None:
        self.say(f"{config} seq {seq} micro {micro}: skipped ({reason})")
        self.result["configurations"][config]["trials"].append(
            {"config": config, "seq_length": seq, "micro_batch": micro, "status": "skipped", "reason": reason})
        self.write()

    def update_ratios(self) -> None:
        ratios = {}
        for seq in self.args.seq:
            best = {c: self.result["configurations"][c]["best"].get(str(seq)) for c in self.args.configs}
            tps = {c: b["tokens_per_s"] for c, b in best.items() if b}
            pairs = {"megatron_over_plain": ("megatron", "plain_hf_peft"),
                     "megatron_over_hf_backend": ("megatron", "hf_backend"),
                     "hf_backend_over_plain": ("hf_backend", "plain_hf_peft")}
            ratios[str(seq)] = {name: tps[a] / tps[b] for name, (a, b) in pairs.items() if a in tps and b in tps}
        self.result["ratios"] = ratios
        if not self.args.tiny:
            best = self.result["configurations"].get("megatron", {}).get("best", {}).get(str(TARGETS["megatron_seq_length"]))
            ratio = ratios.get(str(TARGETS["megatron_seq_length"]), {}).get("megatron_over_plain")
            self.result["targets"] = {
                "megatron_tokens_per_s_per_gpu": {"target": TARGETS["megatron_tokens_per_s_per_gpu"],
                                                  "measured": best["tokens_per_s"] if best else None,
                                                  "met": best["tokens_per_s"] >= TARGETS["megatron_tokens_per_s_per_gpu"]
                                                  if best else None},
                "megatron_over_plain": {"target": TARGETS["megatron_over_plain"], "measured": ratio,
                                        "met": ratio >= TARGETS["megatron_over_plain"] if ratio else None},
                "seq_length": TARGETS["megatron_seq_length"],
                "note": "targets are for an H100; the peak used for MFU is the device's own"}

    def parity(self, parity_spec) -> None:
        from jp_peft.records import layout as rundir

        started = time.perf_counter()
        self.say("stage export (the parity run's hf-peft adapter, merged model, .nemo, export checks)")
        self.worker("export", {"kind": "stage", "spec": parity_spec.to_dict(), "stage": "export", "target": "cpt"})
        export = json.loads(rundir.export_record(parity_spec, "cpt").read_text())
        self.step_done("export", started)
        started = time.perf_counter()
        self.say(f"parity on CPU, fp32: NeMo vs HF+PEFT on {self.args.prompts} Japanese prompts; import -> export hf")
        checked = self.worker("parity", {"kind": "parity", "spec": parity_spec.to_dict(),
                                         "out": str(self.args.work_dir / "parity"), "prompts": self.args.prompts,
                                         "prompt_tokens": self.args.prompt_tokens}, hide_cuda=True)
        checked.pop("wall_seconds", None)
        self.result["parity"] = {"run": parity_spec.name, "steps": parity_spec.cpt.train.max_steps,
                                 "export_checks": export.get("checks", []),
                                 "import_checks": self.result["model"].get("import_checks", []), **checked}
        agreement, trip = checked["nemo_vs_peft"], checked["round_trip"]
        self.say(f"parity: max |logit diff| {agreement['max_abs_diff']:.2e}, mean KL {agreement['mean_kl']:.2e}, "
                 f"top-1 {agreement['top1_agreement']:.4f}; round trip max |weight diff| {trip['max_abs_diff']}")
        self.step_done("parity", started)

    def fits_budget(self, estimate: float) -> bool:
        return self.elapsed() + estimate <= self.args.time_budget

    def parity_reserve(self) -> float:
        """Seconds to keep for the parity run still to come: a Megatron trial's start-up and steps, the
        export and the CPU checks (PARITY_CHECKS_S, a guess until a GPU run has measured it)."""
        wall = self.last_wall.get("megatron", 0.0)
        trials = [t for t in self.result["configurations"].get("megatron", {}).get("trials", []) if t["status"] == "ok"]
        step = trials[-1]["step_time_s"]["median"] if trials else 0.0
        return wall + step * max(0, self.args.parity_steps - self.args.steps) + PARITY_CHECKS_S

    def run(self) -> None:
        """Setup; then per sequence length: every configuration at the first micro batch, the rest of the
        sweep while the time budget allows (keeping time for the parity run), and after the first sequence
        length the parity run (Megatron at its best micro batch for --parity-steps), its export and checks."""
        args = self.args
        for name, action in (("environment", self.check_environment), ("base model", self.prepare_base),
                             ("workload", self.describe_workload), ("shared stages", self.shared_stages)):
            started = time.perf_counter()
            self.say(f"step {name}")
            action()
            if name != "shared stages":
                self.step_done(name, started)
        parity_due = "megatron" in args.configs
        for seq in args.seq:
            reuse = parity_due and args.parity_steps <= args.steps  # the first Megatron trial is long enough
            for config in args.configs:
                record = self.trial(config, seq, args.micro_batches[0], args.steps,
                                    parity_run=reuse and config == "megatron")
                self.last_wall[config] = record["wall_seconds"]
            self.sweep(seq, parity_pending=parity_due and not reuse)
            if parity_due:
                self.parity_run(seq, reuse)
                parity_due = False
        self.result["complete"] = True
        self.write()

    def sweep(self, seq: int, parity_pending: bool) -> None:
        """The other micro batches, smallest first per configuration; one that does not fit ends that
        configuration's sweep, and no trial starts that would end past the time budget."""
        oom_at: dict[str, int] = {}
        for micro in self.args.micro_batches[1:]:
            for config in self.args.configs:
                reserve = self.parity_reserve() if parity_pending else 0.0
                if config in oom_at and micro >= oom_at[config]:
                    self.skipped(config, seq, micro, f"micro batch {oom_at[config]} did not fit")
                elif not self.fits_budget(self.last_wall.get(config, 0.0) * 1.2 + reserve):
                    self.skipped(config, seq, micro, f"time budget {self.args.time_budget:.0f} s")
                else:
                    record = self.trial(config, seq, micro, self.args.steps)
                    self.last_wall[config] = record["wall_seconds"]
                    if record["status"] == "oom":
                        oom_at[config] = micro

    def parity_run(self, seq: int, reuse: bool) -> None:
        args = self.args
        if reuse:
            micro, steps, name = args.micro_batches[0], args.steps, trial_name("megatron", seq, args.micro_batches[0])
        else:
            best = self.result["configurations"]["megatron"]["best"].get(str(seq))
            if best is None:
                raise BenchError("parity run: no Megatron trial fitted on this GPU")
            micro, steps = best["micro_batch"], args.parity_steps
            name = trial_name("megatron", seq, micro) + "-parity"
            self.trial("megatron", seq, micro, steps, parity_run=True, name=name)
        self.parity(trial_spec(args, self.base, name, "megatron", seq, micro, steps))


def echo(line: str) -> bool:
    """Which worker lines the parent shows: jp-peft's stage lines, and every 10th step line."""
    if "[jp-peft]" not in line:
        return "Error" in line and not line.startswith(" ")
    if " step " in line and "/" in line:
        try:
            done = int(line.split(" step ", 1)[1].split("/", 1)[0])
            total = int(line.split(" step ", 1)[1].split("/", 1)[1].split()[0])
        except (ValueError, IndexError):
            return True
        return done % 10 == 0 or done == total or done == 1
    return True


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="gpu_lora_throughput.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="embedded tiny Qwen2 on CPU, a few steps (the tested path)")
    parser.add_argument("--hf-model", type=Path, help="a real Hugging Face checkpoint directory instead of random weights")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--seq", nargs="+", type=int, help="sequence lengths (default 2048; 128 with --tiny)")
    parser.add_argument("--micro-batches", nargs="+", type=int,
                        help="micro batch sweep, smallest first: every configuration runs the first, the others "
                        "while they fit and the time budget allows (default 4 8 16; 2 4 with --tiny)")
    parser.add_argument("--global-batch", type=int, help="sequences per optimizer step (at least the micro batch; "
                        "default 16, the preset's; 4 with --tiny)")
    parser.add_argument("--steps", type=int, help="optimizer steps of a sweep trial (default 20; 6 with --tiny)")
    parser.add_argument("--warmup", type=int, help="steps left out of the medians (default 5; 2 with --tiny)")
    parser.add_argument("--parity-steps", type=int, help="LoRA steps of the Megatron parity run, at Megatron's best "
                        "micro batch (default 200; 6 with --tiny: at most --steps, the first trial is the parity run)")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (default 32)")
    parser.add_argument("--prompts", type=int, default=32, help="Japanese prompts of the logit comparison")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--time-budget", type=float, help="seconds the whole run should take: a sweep trial starts "
                        "only if it and the parity run still to come fit (default 450 on a GPU; 1800 with --tiny)")
    parser.add_argument("--worker-timeout", type=float, default=900.0, help="seconds one worker process may run")
    parser.add_argument("--work-dir", type=Path, help="scratch directory (default: a new one under /tmp)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results", help="where the JSON goes")
    parser.add_argument("--dryrun", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    defaults = {"seq": [128], "micro_batches": [2, 4], "global_batch": 4, "steps": 6, "warmup": 2, "parity_steps": 6,
                "time_budget": 1800.0} if args.tiny else {
        "seq": [2048], "micro_batches": [4, 8, 16], "global_batch": 16, "steps": 20, "warmup": 5, "parity_steps": 200,
        "time_budget": 450.0}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tiny and args.hf_model:
        parser.error("--tiny trains the embedded tiny model; --hf-model is for the GPU run")
    if args.steps <= args.warmup + 1:
        parser.error(f"--steps {args.steps} leaves fewer than 2 steps after --warmup {args.warmup}")
    if len(set(args.micro_batches)) != len(args.micro_batches):
        parser.error("--micro-batches repeats a value")
    args.work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_gpu_lora_"))
    args.work_dir = args.work_dir.resolve()
    args.results = args.results.resolve()
    return args


def plan_lines(args) -> list[str]:
    lines = [f"mode {'tiny-cpu' if args.tiny else 'gpu'}; work dir {args.work_dir}; results under {args.results}",
             "1. environment, base model "
             + ("(embedded tiny Qwen2)" if args.tiny else f"({args.hf_model or 'Qwen2.5-0.5B config, random weights'})"),
             "2. shared stages: import, data"]
    reuse = args.parity_steps <= args.steps
    for index, seq in enumerate(args.seq):
        for config in args.configs:
            parity = index == 0 and reuse and config == "megatron"
            lines.append(f"{len(lines)}. {config} seq {seq} micro {args.micro_batches[0]}: {args.steps} steps"
                         + (" (the parity run)" if parity else ""))
        for micro in args.micro_batches[1:]:
            for config in args.configs:
                lines.append(f"{len(lines)}. {config} seq {seq} micro {micro}: {args.steps} steps (if it fits, and "
                             f"within {args.time_budget:.0f} s)")
        if index == 0 and "megatron" in args.configs:
            if not reuse:
                lines.append(f"{len(lines)}. megatron seq {seq} at its best micro batch: {args.parity_steps} steps "
                             "(the parity run)")
            lines.append(f"{len(lines)}. export of the parity run; parity on {args.prompts} prompts; import -> export hf")
    return lines


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])
    args = parse_args(argv)
    if args.dryrun:
        print("\n".join(plan_lines(args)))
        return 0
    bench = Bench(args, argv)
    bench.say("plan:\n  " + "\n  ".join(plan_lines(args)))
    try:
        bench.run()
    except BaseException as exc:  # noqa: BLE001 - a failed or interrupted run still leaves its results file
        step = bench.result["steps"][-1]["step"] if bench.result["steps"] else None
        failed = str(exc).split(":", 1)[0] if isinstance(exc, BenchError) else f"after {step or 'start'}"
        bench.result.update(failed_step=failed, error=f"{type(exc).__name__}: {exc}"[-8000:])
        bench.write()
        print(f"\nFAILED at step {failed!r}: {type(exc).__name__}: {exc}\nresults so far: {bench.path}",
              file=sys.stderr, flush=True)
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    bench.say(f"done in {bench.elapsed():.0f} s; results: {bench.path}")
    print(summary_text(bench.result))
    return 0


def summary_text(result: dict) -> str:
    lines = [f"{'configuration':<15} {'seq':>5} {'micro':>5} {'tokens/s':>12} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}"]
    for config, entry in result["configurations"].items():
        for seq, best in entry["best"].items():
            mfu = f"{best['mfu']:.1%}" if best["mfu"] is not None else "-"
            memory = f"{best['peak_memory_mb'] / 1024:.1f}" if best["peak_memory_mb"] else "-"
            lines.append(f"{config:<15} {seq:>5} {best['micro_batch']:>5} {best['tokens_per_s']:>12,.0f} "
                         f"{best['tflops_per_s']:>8.2f} {mfu:>6} {memory:>8}")
    for seq, ratios in result["ratios"].items():
        lines.append(f"seq {seq}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""What runs inside a worker process: one job, read from a JSON file, its result written beside it.

Kinds: `stage` (a jp-peft stage exactly as its NeMo-Run task runs it), `base` (the base model),
`plain` (the plain transformers + peft loop) and `parity` (the CPU fp32 NeMo-vs-HF checks).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.gpu import REPO, BenchError
from bench.gpu.model import copy_in_fp32, write_random_base


def numpy_compat() -> list[str]:
    """megatron-core 0.15's dist_checkpointing still calls np.product (validation.py, exchange_utils.py,
    mapping.py: a checkpoint save fails on it), which numpy 2.0 removed; megatron-core 0.16 calls
    np.prod (Megatron-LM issue 1563), but NeMo 2.7.3 needs 0.15. The device image has numpy 2.5.2, and
    carrying numpy 1.26 would mean carrying pandas and pyarrow built for it too, more than a device call
    may carry (bench/gpu/carry_accepted.txt): on numpy 2, restore the alias. Returns what it changed."""
    import numpy

    if hasattr(numpy, "product"):
        return []
    numpy.product = numpy.prod
    return [f"numpy.product = numpy.prod (numpy {numpy.__version__} removed it; megatron-core 0.15 calls it)"]


def worker_main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    started = time.perf_counter()
    run = JOBS.get(job["kind"])
    if run is None:
        raise ValueError(f"unknown worker kind {job['kind']!r}")
    compat = numpy_compat()
    result = run(job)
    result["compat"] = compat
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
    import fiddle as fdl

    config = task_config(task)
    if config.recipe is None:  # the hf backend: nothing composed to adjust
        fdl.build(config)()
        return {"recipe_adjustments": []}
    adjustments = adjust_recipe_for_this_machine(config)
    fdl.build(config)()
    return {"recipe_adjustments": adjustments}


def adjust_recipe_for_this_machine(config) -> list[str]:
    """On a GPU without Apex's/Megatron's compiled fused-softmax kernel (any machine without NVIDIA's NeMo
    container), bf16 attention with masked_softmax_fusion imports `scaled_masked_softmax_cuda`
    (megatron/core/fusions/fused_softmax.py:357) and fails on the first forward: use the unfused softmax,
    as backends/megatron.use_cpu does on CPU. Returns what was changed (recorded in the results)."""
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
    """The base model, and the device's dense bf16 peak for MFU: asked here, in a worker, so that the
    parent process never opens a CUDA context (it would hold GPU memory through every trial)."""
    from transformers import AutoConfig

    from jp_peft.training.flops import peak_tflops
    from jp_peft.models.shapes import parameter_count

    out = Path(job["out"])
    info = copy_in_fp32(Path(job["source"]), out) if job.get("source") else write_random_base(out)
    config = AutoConfig.from_pretrained(out)
    return {**info, "parameters": parameter_count(config), "hf_config": config.to_diff_dict(),
            "peak_tflops": peak_tflops()}


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
    from jp_peft.backends.megatron.merge import merge_lora, nemo_logits
    from jp_peft.spec import experiment_from_dict

    megatron_cpu.enable()
    spec = experiment_from_dict(job["spec"])
    out = Path(job["out"])
    ids = japanese_prompts(rundir.base_model_dir(spec), job["prompts"], job["prompt_tokens"])
    nemo_form = "NeMo LoRA checkpoint merged in fp32 (jp_peft.backends.megatron.merge.merge_lora fp32=True), Megatron forward"
    if spec.cpt.train.precision.startswith(("bf16", "16")):
        merged = out / "nemo_merged_fp32"
        try:
            merge_lora(last_checkpoint(rundir.nemo_checkpoints(spec, "cpt")), merged, fp32=True)
        except Exception as exc:  # keep the numbers, say which form they are of
            merged = rundir.nemo_merged(spec, "cpt")
            nemo_form = (f"the export stage's bf16 merge_lora result (the fp32 merge failed: {type(exc).__name__}: "
                         f"{exc}), Megatron forward")
    else:  # an fp32 run's export stage already merged in fp32
        merged = rundir.nemo_merged(spec, "cpt")
    nemo = nemo_logits(merged, ids)
    peft = parity.peft_logits(rundir.hf_adapter(spec, "cpt"), ids)
    result = {"nemo_vs_peft": {**parity.logit_agreement(nemo, peft), "nemo_form": nemo_form,
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


JOBS = {"stage": run_stage_job, "base": run_base_job, "plain": run_plain_job, "parity": run_parity_job}

"""What the Hugging Face backend's stages do when they run: import, train (+ adapter/merged export), export check."""

from __future__ import annotations

from jp_peft import rundir
from jp_peft.metrics import StageMetrics
from jp_peft.spec import ExperimentSpec


def import_model(spec: ExperimentSpec, hf_dir: str, recipe=None) -> dict:
    """Nothing beyond the Hugging Face base itself: the backend trains it directly."""
    return {}


def stage_paths(spec: ExperimentSpec, stage: str) -> dict:
    data = spec.stage(stage).data
    paths = {"val_ja": data.val_ja, "val_en": data.val_en}
    if stage == "cpt":
        paths["blend_prefixes"] = [b.prefix for b in data.blend]
    else:
        paths["sft_train"] = data.sft_train
    return paths


def train(spec: ExperimentSpec, stage: str, recipe=None) -> StageMetrics:
    """Train the stage with transformers (+ peft) + Lightning, export what its method exports (hf_methods),
    and keep the trained model's logits on held-out ids for the export checks."""
    import torch

    from jp_peft.backends import hf_methods
    from jp_peft.backends.hf import train_stage
    from jp_peft.callbacks.wandb_run import log_adapter_artifact, wandb_logger
    from jp_peft.export import parity
    from jp_peft.tracking import flops_per_token_fn

    stage_dir = rundir.stage_dir(spec, stage)
    stage_dir.mkdir(parents=True, exist_ok=True)
    base = rundir.stage_start_hf(spec, stage)
    method = spec.stage(stage).method
    shape = "all parameters" if method == "full" else f"LoRA r={spec.lora.rank} alpha={spec.lora.alpha}" + (
        " + embeddings/output layer" if method == "lora_embed" else "")
    print(f"[jp-peft] {stage}: {method} ({shape}) on {base}", flush=True)
    logger = wandb_logger(spec, stage)
    metrics, model, tokenizer = train_stage(spec, stage, base, stage_dir, stage_paths(spec, stage),
                                            [logger] if logger else [], [], flops_per_token_fn)
    written = hf_methods.export(model, tokenizer, base, stage_dir)
    with torch.no_grad():
        ids = parity.held_out_ids(spec.stage(stage).data.val_ja)
        torch.save(model.float()(input_ids=ids.to(model.device)).logits.float().cpu(), rundir.trained_logits(spec, stage))
    if logger is not None:
        if "hf_adapter" in written:
            log_adapter_artifact(logger, spec, stage, rundir.hf_adapter(spec, stage), metrics.to_dict())
        logger.experiment.summary.update({k: v for k, v in metrics.to_dict().items() if isinstance(v, (int, float))})
        logger.experiment.finish()
    return metrics


def export(spec: ExperimentSpec, stage: str) -> dict:
    """The exported models must reproduce the trained one: hf_merged against the trained model's logits
    (every method), and the adapter on the base it names against hf_merged (PEFT methods; full has none)."""
    import torch

    from jp_peft.export import parity

    metrics = rundir.read_json(rundir.metrics_file(spec, stage), f"export of {stage}")
    method = metrics.get("method", "lora")
    ids = parity.held_out_ids(spec.stage(stage).data.val_ja)
    merged = parity.hf_logits(rundir.hf_merged(spec, stage), ids)
    checks = []
    trained = rundir.trained_logits(spec, stage)
    if trained.exists():  # written by train since the methods came in
        checks.append(parity.check("hf_merged_vs_trained", merged, torch.load(trained), parity.FP32_ATOL,
                                   "the saved model is the trained one (merged in fp32 for PEFT methods)"))
    if method != "full":
        checks.append(parity.check("peft_adapter_vs_hf_merged", parity.peft_logits(rundir.hf_adapter(spec, stage), ids),
                                   merged, parity.FP32_ATOL,
                                   "merge_and_unload adds the same scale*B@A the adapter computes on the fly (fp32)"))
    parity.require(checks, f"export of {stage}")
    for check in checks:
        print(f"[jp-peft] export {stage}: {check['check']} max |logit diff| {check['max_abs_diff']:.2e}", flush=True)
    record = {"method": method, "hf_merged": str(rundir.hf_merged(spec, stage)),
              "adapter_base": rundir.stage_start_hf(spec, stage), "checks": checks}
    # No adapter under full: the record says so (None), and nothing downstream looks for one.
    record["hf_adapter"] = str(rundir.hf_adapter(spec, stage)) if method != "full" else None
    return record

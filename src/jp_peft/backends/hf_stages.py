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
    """Train the LoRA stage with transformers + peft + Lightning, export hf_adapter/ and hf_merged/."""
    from jp_peft.backends.hf import export_hf, train_stage
    from jp_peft.callbacks.wandb_run import log_adapter_artifact, wandb_logger
    from jp_peft.tracking import flops_per_token_fn

    stage_dir = rundir.stage_dir(spec, stage)
    stage_dir.mkdir(parents=True, exist_ok=True)
    base = rundir.stage_start_hf(spec, stage)
    print(f"[jp-peft] {stage}: LoRA r={spec.lora.rank} alpha={spec.lora.alpha} on {base}", flush=True)
    logger = wandb_logger(spec, stage)
    metrics, model, tokenizer = train_stage(spec, stage, base, stage_dir, stage_paths(spec, stage),
                                            [logger] if logger else [], [], flops_per_token_fn)
    export_hf(model, tokenizer, base, stage_dir)
    if logger is not None:
        log_adapter_artifact(logger, spec, stage, rundir.hf_adapter(spec, stage), metrics.to_dict())
        logger.experiment.summary.update({k: v for k, v in metrics.to_dict().items() if isinstance(v, (int, float))})
        logger.experiment.finish()
    return metrics


def export(spec: ExperimentSpec, stage: str) -> dict:
    """The adapter on the base it names must reproduce the merged model (both written by `train`)."""
    from jp_peft.export import parity

    rundir.read_json(rundir.metrics_file(spec, stage), f"export of {stage}")
    ids = parity.held_out_ids(spec.stage(stage).data.val_ja)
    check = parity.check("peft_adapter_vs_hf_merged", parity.peft_logits(rundir.hf_adapter(spec, stage), ids),
                         parity.hf_logits(rundir.hf_merged(spec, stage), ids), parity.FP32_ATOL,
                         "merge_and_unload adds the same scale*B@A the adapter computes on the fly (fp32)")
    parity.require([check], f"export of {stage}")
    print(f"[jp-peft] export {stage}: {check['check']} max |logit diff| {check['max_abs_diff']:.2e}", flush=True)
    return {"hf_adapter": str(rundir.hf_adapter(spec, stage)), "hf_merged": str(rundir.hf_merged(spec, stage)),
            "adapter_base": rundir.stage_start_hf(spec, stage), "checks": [check]}

"""What the Hugging Face backend's stages do when they run: train (+ adapter/merged export), export check."""

from __future__ import annotations

from jp_peft.records import layout as rundir
from jp_peft.records.export_record import ExportRecord
from jp_peft.records.metrics import StageMetrics, read_stage_metrics
from jp_peft.spec import ExperimentSpec
from jp_peft.spec.stages import PREFERENCE, stage as stage_row


def train(spec: ExperimentSpec, stage: str) -> StageMetrics:
    """Train the stage with transformers (+ peft) + Lightning, export what its method exports (hf methods),
    and keep the trained model's logits on held-out ids for the export checks."""
    import torch

    from jp_peft.backends.hf import methods as hf_methods
    from jp_peft.backends.hf.trainer import train_stage
    from jp_peft.export import parity
    from jp_peft.training.ranks import is_rank_zero
    from jp_peft.training.wandb_run import log_adapter_artifact, wandb_logger

    rundir.stage_dir(spec, stage).mkdir(parents=True, exist_ok=True)
    base = rundir.stage_start_hf(spec, stage)
    method = spec.stage(stage).method
    shape = "all parameters" if method == "full" else f"LoRA r={spec.lora.rank} alpha={spec.lora.alpha}" + (
        " + embeddings/output layer" if method == "lora_embed" else "")
    print(f"[jp-peft] {stage}: {method} ({shape}) on {base}", flush=True)
    if stage_row(stage).data_kind == PREFERENCE:  # TRL's DPOTrainer (a Hugging Face Trainer), not Lightning
        from jp_peft.backends.hf.dpo import last_checkpoint, train_dpo_stage as train_stage

        resuming = last_checkpoint(rundir.trainer_checkpoints(spec, stage)) is not None
    else:
        resuming = rundir.trainer_last_checkpoint(spec, stage).exists()
    # Several ranks (DDP): one W&B run and one set of exports, by rank 0; the others return their metrics
    # (run_train waits for every rank before rank 0 writes metrics.json)
    logger = wandb_logger(spec, stage, resuming=resuming) if is_rank_zero() else None
    metrics, model, tokenizer = train_stage(spec, stage, base, [logger] if logger else [])
    if not is_rank_zero():
        return metrics
    written = hf_methods.export(model, tokenizer, base, rundir.hf_adapter(spec, stage), rundir.hf_merged(spec, stage))
    with torch.no_grad():
        ids = parity.held_out_ids(spec.stage(stage).data.val_ja)
        trained = model if hf_methods.is_quantized(model) else model.float()  # a 4-bit model has no .float()
        torch.save(trained(input_ids=ids.to(model.device)).logits.float().cpu(), rundir.trained_logits(spec, stage))
    if logger is not None:
        if "hf_adapter" in written:
            log_adapter_artifact(logger, spec, stage, rundir.hf_adapter(spec, stage), metrics.to_dict())
        logger.experiment.summary.update({k: v for k, v in metrics.to_dict().items() if isinstance(v, (int, float))})
        logger.experiment.finish()
    return metrics


def export(spec: ExperimentSpec, stage: str) -> ExportRecord:
    """The exported models must reproduce the trained one: hf_merged against the trained model's logits
    (every method), and the adapter on the base it names against hf_merged (PEFT methods; full has none)."""
    import torch

    from jp_peft.export import parity

    metrics = read_stage_metrics(rundir.metrics_file(spec, stage))
    method, quantized = metrics.method, metrics.extra.get("quantization")
    ids = parity.held_out_ids(spec.stage(stage).data.val_ja)
    merged = parity.hf_logits(rundir.hf_merged(spec, stage), ids)
    trained = rundir.trained_logits(spec, stage)
    if not trained.exists():  # training writes it; without it nothing shows the export is the trained model
        raise rundir.MissingRecord(f"export of {stage}: {trained} not found; rerun the {stage} stage")
    if quantized:  # QLoRA: the full-precision merge against the 4-bit model it was trained as
        from jp_peft.backends.hf.methods import load_base

        with torch.no_grad():
            base = metrics.base_model
            nf4 = load_base(base, model_spec=spec.model).eval()(input_ids=ids.to(_device())).logits.float().cpu()
            base_gap = float((parity.hf_logits(base, ids) - nf4).abs().max())
        checks = [parity.quantized_check("hf_merged_vs_trained_nf4", merged, torch.load(trained), base_gap)]
    else:
        checks = [parity.check("hf_merged_vs_trained", merged, torch.load(trained), parity.FP32_ATOL,
                               "the saved model is the trained one (merged in fp32 for PEFT methods)")]
    if method != "full":
        checks.append(parity.check("peft_adapter_vs_hf_merged", parity.peft_logits(rundir.hf_adapter(spec, stage), ids),
                                   merged, parity.FP32_ATOL,
                                   "merge_and_unload adds the same scale*B@A the adapter computes on the fly (fp32)"))
    parity.require(checks, f"export of {stage}")
    for check in checks:
        print(f"[jp-peft] export {stage}: {check['check']} max |logit diff| {check['max_abs_diff']:.2e}", flush=True)
    # No adapter under full: the record says so (None), and nothing downstream looks for one.
    return ExportRecord(method=method, hf_merged=str(rundir.hf_merged(spec, stage)),
                        hf_adapter=str(rundir.hf_adapter(spec, stage)) if method != "full" else None,
                        adapter_base=rundir.stage_start_hf(spec, stage), checks=checks)


def _device():
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"

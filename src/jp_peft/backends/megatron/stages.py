"""What the Megatron backend's stages do when they run: import, train (a composed NeMo recipe), export.

Every function here runs inside a stage's own process. On a machine without CUDA it first applies
backends/megatron/cpu.py (the embedded tiny model, or a local model directory: the real-shape tier,
backends/megatron/__init__.py cpu_allowed); on a GPU without Transformer Engine only its TE adaptations;
on a GPU with TE nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from jp_peft.records import layout as rundir
from jp_peft.backends.megatron.compose import stage_start_nemo
from jp_peft.training.interrupt import StageInterrupted
from jp_peft.records.export_record import ExportRecord
from jp_peft.records.metrics import StageMetrics
from jp_peft.spec import ExperimentSpec


def prepare_process(spec: ExperimentSpec) -> list[str]:
    """Apply the upstream adaptations this machine needs; returns what was applied."""
    import torch

    from jp_peft.backends.megatron import cpu as megatron_cpu

    if torch.cuda.is_available():
        return megatron_cpu.enable_for_gpu()
    from jp_peft.backends.megatron import cpu_allowed

    if not cpu_allowed(spec) or spec.cluster.accelerator != "cpu":
        raise RuntimeError("no CUDA device in this process: the Megatron backend runs on CPU only for the "
                           "embedded tiny model or a local model directory (the real-shape tier), with "
                           "cluster.accelerator=cpu")
    return megatron_cpu.enable()


@contextlib.contextmanager
def nemo_tokenizer_lock():
    """NeMo's HF importer and merge_lora save the tokenizer to a fixed /tmp/nemo_tokenizer
    (nemo/lightning/io/connector.py:319, nemo/collections/llm/peft/api.py:197): jobs sharing a node
    take turns instead of overwriting each other's copy mid-read."""
    with open("/tmp/nemo_tokenizer.jp-peft.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def checkpoint_complete(path: Path) -> bool:
    return (path / "context" / "io.json").exists() and (path / "weights" / "metadata.json").exists()


# --- import -----------------------------------------------------------------------------------

def import_model(spec: ExperimentSpec, hf_dir: str, recipe) -> dict:
    """The recipe's `llm.import_ckpt` (built by NeMo-Run: its model is an instance, as import_ckpt
    needs), then HF base vs imported logits (fp32) as proof."""
    from jp_peft.backends.megatron.merge import nemo_logits
    from jp_peft.export import parity

    prepare_process(spec)
    output = Path(recipe.keywords["output_path"])
    if recipe.keywords["source"] != f"hf://{hf_dir}":
        raise ValueError(f"import: the recipe imports {recipe.keywords['source']}, but the base is {hf_dir}")
    if checkpoint_complete(output):
        print(f"[jp-peft] import: {output} exists, reused", flush=True)
    else:
        with nemo_tokenizer_lock():
            recipe()
    ids = parity.random_ids(_vocab_size(hf_dir))
    check = parity.check("hf_base_vs_nemo_import", parity.hf_logits(hf_dir, ids), nemo_logits(output, ids),
                         parity.FP32_ATOL, "fp32, the same weights through two implementations")
    parity.require([check], f"import of {hf_dir}")
    print(f"[jp-peft] import: HF base vs NeMo-imported logits max |diff| {check['max_abs_diff']:.2e}", flush=True)
    return {"nemo_checkpoint": str(output), "parity": [check]}


def _vocab_size(hf_dir: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(hf_dir).vocab_size


# --- training ---------------------------------------------------------------------------------

def train(spec: ExperimentSpec, stage: str, recipe) -> StageMetrics:
    """Run the composed NeMo recipe (llm.finetune, built by NeMo-Run), then write its metrics record."""
    from jp_peft.training.early_stopping import fired
    from jp_peft.backends.megatron.language_validation import LanguageValidation
    from jp_peft.training.ranks import is_rank_zero
    from jp_peft.training.wandb_run import wandb_mode

    prepare_process(spec)
    # The composed WandbLogger is online by default; offline unless this process has a key (decided here,
    # where the job runs: on Slurm the key arrives at run time from wandb_key_file)
    os.environ["WANDB_MODE"] = wandb_mode()
    start_hf = rundir.stage_start_hf(spec, stage)
    start_nemo = stage_start_nemo(spec, stage)
    if not checkpoint_complete(start_nemo):
        raise rundir.MissingRecord(f"{stage}: the NeMo checkpoint to start from, {start_nemo}, is missing or incomplete")
    trainer, model = recipe.keywords["trainer"], recipe.keywords["model"]
    resumed = last_checkpoint(rundir.nemo_checkpoints(spec, stage), missing_ok=True)
    if resumed is None and is_rank_zero():  # a fresh start: nothing of an earlier attempt that saved no checkpoint counts
        rundir.train_log(spec, stage).unlink(missing_ok=True)
        rundir.val_baseline(spec, stage).unlink(missing_ok=True)
    started = time.perf_counter()
    max_steps = spec.stage(stage).train.max_steps
    try:
        recipe()
    except SystemExit:
        # NeMo's PreemptionCallback exits 0 once it saved (preemption.py:74): a stage that stopped early
        # is not done, and must not look done to the launcher or to Slurm's afterok
        if trainer.global_step >= max_steps:
            raise
    wall = time.perf_counter() - started
    stopped = fired(trainer.callbacks)
    if trainer.global_step < max_steps and stopped is None:
        raise StageInterrupted(stage, trainer.global_step, max_steps, rundir.nemo_checkpoints(spec, stage))
    validation = next(cb for cb in trainer.callbacks if isinstance(cb, LanguageValidation))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return StageMetrics.from_train_log(
        rundir.train_log(spec, stage), stage=stage, backend="megatron", steps=trainer.global_step, base_model=start_hf,
        base_val_loss_ja=validation.baseline["ja"], base_val_loss_en=validation.baseline["en"],
        val_loss_ja=validation.final["ja"], val_loss_en=validation.final["en"],
        trainable_params=trainable, total_params=frozen + trainable, wall_seconds=wall,
        precision=spec.stage(stage).train.precision, resumed_from=str(resumed) if resumed else None,
        val_history=validation.history, method=spec.stage(stage).method,
        early_stopped_at_step=stopped.stopped_at_step if stopped else None,
        stop_reason=stopped.stop_reason if stopped else None,
        extra={"nemo_start": str(start_nemo),
               "last_checkpoint": str(last_checkpoint(rundir.nemo_checkpoints(spec, stage)))})


def last_checkpoint(ckpt_dir: Path, missing_ok: bool = False) -> Path | None:
    """The checkpoint NeMo's AutoResume would resume a stage from: the newest finished `*-last` one
    (nemo/lightning/resume.py _find_trainer_ckpt_path; an interrupted save leaves an unfinished marker)."""
    from nemo.lightning.pytorch.callbacks.model_checkpoint import ModelCheckpoint

    finished = []
    for path in Path(ckpt_dir).glob("*-last") if Path(ckpt_dir).exists() else ():
        try:
            if path.is_dir() and not ModelCheckpoint.is_checkpoint_unfinished(path):
                finished.append((path.stat().st_mtime, path))
        except FileNotFoundError:  # removed while we looked (NeMo prunes unfinished and old "last" ones)
            continue
    candidates = [path for _, path in sorted(finished)]
    if not candidates:
        if missing_ok:
            return None
        raise rundir.MissingRecord(f"{ckpt_dir}: no *-last checkpoint; did the stage finish?")
    return candidates[-1]


# --- export -----------------------------------------------------------------------------------

def export(spec: ExperimentSpec, stage: str) -> ExportRecord:
    """The trained stage's last checkpoint -> what its method exports, each form checked against the model
    it came from: lora and lora_embed give hf_adapter (lora_embed's with the embeddings and output layer as
    modules_to_save), and all methods nemo_merged -> hf_merged and model.nemo (full: the whole trained model,
    weights only). backends/megatron/methods.py says what happens to tied embeddings."""
    import shutil

    from nemo.collections import llm

    from jp_peft.backends.megatron.merge import nemo_logits
    from jp_peft.export import parity
    from jp_peft.backends.megatron.hf_peft import register_qwen2_hf_peft_exporter
    from jp_peft.backends.megatron.merge import merge_lora, save_whole_model
    from jp_peft.backends.megatron.nemo_archive import write_nemo_archive

    prepare_process(spec)
    method = spec.stage(stage).method
    ckpt = last_checkpoint(rundir.nemo_checkpoints(spec, stage))
    start_hf = rundir.stage_start_hf(spec, stage)
    merged = rundir.nemo_merged(spec, stage)
    precision = spec.stage(stage).train.precision
    fp32 = not precision.startswith(("bf16", "16"))
    adapter = rundir.hf_adapter(spec, stage) if method != "full" else None
    if adapter is not None:
        register_qwen2_hf_peft_exporter()
        # The adapter names the model this stage trained on: the base, or for SFT the merged CPT model.
        llm.export_ckpt(path=ckpt, target="hf-peft", output_path=adapter, overwrite=True,
                        base_model_name_or_path=start_hf)
    else:  # a full stage has no adapter: none of an earlier run may stay behind to be taken for this one's
        shutil.rmtree(rundir.hf_adapter(spec, stage), ignore_errors=True)
    with nemo_tokenizer_lock():
        if method == "full":
            save_whole_model(ckpt, merged)
        else:
            merge_lora(ckpt, merged, fp32=fp32)
    llm.export_ckpt(path=merged, target="hf", output_path=rundir.hf_merged(spec, stage), overwrite=True)
    archive = write_nemo_archive(merged, rundir.nemo_archive(spec, stage))

    ids = parity.held_out_ids(spec.stage(stage).data.val_ja)
    hf_merged = parity.hf_logits(rundir.hf_merged(spec, stage), ids)
    nemo_merged = nemo_logits(merged, ids)
    rounded = "merge rounds merged weights to bf16 (nemo/collections/llm/peft/api.py:104,126)"
    atol = parity.FP32_ATOL if fp32 else 5e-2
    checks = [
        parity.check("trained_vs_nemo_merged", nemo_logits(ckpt, ids), nemo_merged,
                     parity.FP32_ATOL if fp32 or method == "full" else atol,
                     "the stage's own checkpoint as trained against its merged export: "
                     + ("the same weights (full)" if method == "full" else "fp32 merge: summation order only" if fp32
                        else rounded)),
        parity.check("nemo_merged_vs_hf_merged", nemo_merged, hf_merged, parity.FP32_ATOL,
                     "the same merged weights through Megatron and Hugging Face forwards"),
    ]
    if adapter is not None:
        checks.append(parity.check("peft_adapter_vs_hf_merged", parity.peft_logits(adapter, ids), hf_merged, atol,
                                   "fp32 merge and fp32 forward: summation order only" if fp32 else rounded))
    parity.require(checks, f"export of {stage}")
    for c in checks:
        print(f"[jp-peft] export {stage}: {c['check']} max |logit diff| {c['max_abs_diff']:.2e} (<= {c['atol']:.0e})",
              flush=True)
    return ExportRecord(checkpoint=str(ckpt), method=method, hf_adapter=str(adapter) if adapter else None,
                        hf_merged=str(rundir.hf_merged(spec, stage)), nemo_merged=str(merged), nemo=archive,
                        adapter_base=start_hf if adapter else None, checks=checks)

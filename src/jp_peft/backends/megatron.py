"""The NeMo Megatron backend: the spec translated into NVIDIA's own `nemo.collections.llm` objects.

The recipes in recipes/qwen25_500m_ja.py start from `llm.qwen25_500m.finetune_recipe` and
change only what the spec says differently, with the helpers here. Needs CUDA to run; composing
(and --dryrun) works anywhere.
"""

from __future__ import annotations

from pathlib import Path

import nemo_run as run

from jp_peft.data.blend import nemo_blend_paths
from jp_peft.lora_mapping import nemo_peft_kwargs
from jp_peft.spec import ExperimentSpec, LoraSpec, StageSpec


def nemo_home() -> Path:
    import os

    return Path(os.environ.get("NEMO_HOME", Path.home() / ".cache" / "nemo"))


def imported_base_path(model_name: str) -> Path:
    """Where import_base puts the NeMo checkpoint: NeMo's own layout, NEMO_HOME/models/<hub id>,
    so that `nemo://Qwen/Qwen2.5-0.5B` finds it; a local HF directory imports as local/<dir name>."""
    local = Path(model_name)
    key = f"local/{local.name}" if local.is_absolute() or local.exists() else model_name
    return nemo_home() / "models" / key


def import_base(model_name: str, output_path: str) -> str:
    """`llm.import_ckpt` from a hub id or a local HF directory, skipped when already imported."""
    from nemo.collections import llm

    output = Path(output_path)
    if (output / "context").exists() and (output / "weights").exists():
        print(f"[jp-peft] import: {output} exists, skipped", flush=True)
        return str(output)
    llm.import_ckpt(model=llm.qwen25_500m.model(), source=f"hf://{model_name}", output_path=output)
    return str(output)


def peft_config(lora: LoraSpec) -> run.Config:
    from nemo.collections import llm

    class_name, kwargs = nemo_peft_kwargs(lora)
    return run.Config(getattr(llm.peft, class_name), **kwargs)


def apply_training(recipe: run.Partial, spec: ExperimentSpec, stage: StageSpec) -> None:
    """Trainer, strategy and optimiser fields of a composed finetune recipe, from the spec."""
    train, cluster = stage.train, spec.cluster
    trainer = recipe.trainer
    trainer.num_nodes = cluster.num_nodes
    trainer.devices = cluster.gpus_per_node
    trainer.max_steps = train.max_steps
    trainer.val_check_interval = train.val_check_interval
    trainer.limit_val_batches = train.limit_val_batches
    trainer.gradient_clip_val = train.grad_clip
    trainer.strategy.tensor_model_parallel_size = cluster.tensor_parallel
    trainer.strategy.pipeline_model_parallel_size = cluster.pipeline_parallel
    trainer.strategy.context_parallel_size = cluster.context_parallel
    trainer.plugins = precision_plugin(train.precision)
    optim = recipe.optim
    optim.config.lr = train.lr
    optim.config.weight_decay = train.weight_decay
    optim.config.clip_grad = train.grad_clip
    optim.lr_scheduler.warmup_steps = train.warmup_steps
    optim.lr_scheduler.min_lr = train.min_lr


def precision_plugin(precision: str) -> run.Config:
    from nemo.collections.llm.recipes.precision.mixed_precision import bf16_mixed, fp16_mixed
    from nemo.lightning.pytorch.plugins.mixed_precision import MegatronMixedPrecision

    if precision in ("bf16-mixed", "bf16-true"):
        return bf16_mixed()
    if precision == "16-mixed":
        return fp16_mixed()
    return run.Config(MegatronMixedPrecision, precision="32")


def step_metrics(spec: ExperimentSpec, stage: str) -> run.Config:
    """jp-peft's throughput/MFU callback, with Qwen2.5-0.5B's FLOPs per token (callbacks/flops.py)."""
    from jp_peft.callbacks.flops import QWEN25_05B, lora_flops_per_token
    from jp_peft.callbacks.step_metrics import MegatronStepMetrics

    data, train = spec.stage(stage).data, spec.stage(stage).train
    flops = lora_flops_per_token(QWEN25_05B, data.seq_length, spec.lora.rank, spec.lora.target_modules)
    return run.Config(MegatronStepMetrics, tokens_per_step=train.global_batch_size * data.seq_length,
                      flops_per_token=flops)


def cpt_data(spec: ExperimentSpec) -> run.Config:
    """Megatron's PreTrainingDataModule over the weighted blend; validation on held-out Japanese."""
    from nemo.collections import llm

    data, train = spec.cpt.data, spec.cpt.train
    return run.Config(
        llm.PreTrainingDataModule,
        paths={"train": nemo_blend_paths(list(data.blend)), "validation": [data.val_ja], "test": [data.val_ja]},
        seq_length=data.seq_length, micro_batch_size=train.micro_batch_size,
        global_batch_size=train.global_batch_size, seed=train.seed, num_workers=2,
        index_mapping_dir=str(spec.group_dir / "data" / "index_cache"),
    )


def sft_data(spec: ExperimentSpec) -> run.Config:
    """NeMo's FineTuningDataModule on the prepared ChatML input/output JSONL, packed to seq_length."""
    from nemo.collections import llm
    from nemo.collections.llm.gpt.data.packed_sequence import PackedSequenceSpecs

    data, train = spec.sft.data, spec.sft.train
    packing = run.Config(PackedSequenceSpecs, packed_sequence_size=data.seq_length) if data.packing else None
    return run.Config(
        llm.FineTuningDataModule,
        dataset_root=str(Path(data.sft_train).parent), seq_length=data.seq_length,
        micro_batch_size=1 if data.packing else train.micro_batch_size,  # packed: one pack per micro batch
        global_batch_size=train.global_batch_size, seed=train.seed, packed_sequence_specs=packing,
        # The prepared input ends with "<|im_start|>assistant\n" and the output with "<|im_end|>":
        # concatenate them as they are, and let the loss fall on the output only.
        dataset_kwargs={"prompt_template": "{input}{output}", "label_key": "output", "truncation_field": "input",
                        "add_bos": False, "add_eos": False, "answer_only_loss": True},
    )


def logger(spec: ExperimentSpec, stage: str) -> run.Config:
    """NeMoLogger with TensorBoard and W&B (group = experiment, job_type = stage), checkpoints every N steps."""
    from lightning.pytorch.loggers import WandbLogger
    from nemo import lightning as nl

    train = spec.stage(stage).train
    ckpt = run.Config(nl.ModelCheckpoint, save_last=True, save_top_k=-1, every_n_train_steps=train.ckpt_every_n_steps,
                      filename="{model_name}--{step}-{consumed_samples}", save_optim_on_train_end=True)
    wandb = None
    if spec.wandb.enabled:
        wandb = run.Config(WandbLogger, project=spec.wandb.project, entity=spec.wandb.entity, group=spec.group_name,
                           job_type=stage, name=f"{stage}:{spec.name}", tags=[*spec.wandb.tags, stage, "megatron"],
                           save_dir=str(spec.run_dir), config={"spec": spec.to_dict(), "stage": stage})
    from lightning.pytorch.loggers import TensorBoardLogger

    return run.Config(nl.NeMoLogger, name=stage, log_dir=str(spec.run_dir), use_datetime_version=False, ckpt=ckpt,
                      tensorboard=run.Config(TensorBoardLogger, save_dir="tb_logs", name=stage), wandb=wandb)


def resume(restore_from: str) -> run.Config:
    """Resume this stage's own last checkpoint if there is one (a requeued job), else start from
    `restore_from` (the imported base, or the merged CPT model for SFT)."""
    from nemo import lightning as nl

    return run.Config(nl.AutoResume, restore_config=run.Config(nl.RestoreConfig, path=restore_from),
                      resume_if_exists=True, resume_ignore_no_checkpoint=True)


def merged_cpt_path(spec: ExperimentSpec) -> Path:
    return spec.run_dir / "cpt" / "nemo_merged"


def stage_task(spec: ExperimentSpec, stage: str, target: str | None = None):
    """The NeMo-Run callable of one stage on this backend."""
    import recipes.qwen25_500m_ja as recipe_module

    from jp_peft.stages import run_stage

    if stage == "import":
        return recipe_module.import_base(spec=spec.to_dict())
    if stage == "cpt":
        return recipe_module.cpt_lora(spec=spec.to_dict())
    if stage == "sft":
        return recipe_module.sft_lora(spec=spec.to_dict())
    if stage == "export":
        from jp_peft.export.megatron import export_stage

        return run.Partial(export_stage, spec=spec.to_dict(), stage=target)
    return run.Partial(run_stage, spec=spec.to_dict(), stage=stage, target=target)

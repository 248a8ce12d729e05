"""The NeMo Megatron backend: the spec translated into NVIDIA's own `nemo.collections.llm` objects.

The recipes in src/jp_peft/recipes/qwen25_500m_ja.py start from `llm.qwen25_500m.finetune_recipe` and change
only what the spec says differently, with the helpers here. Composing needs neither CUDA nor a
model on disk; `backends/megatron/stages.py` runs what is composed.
"""

from __future__ import annotations

import os
from pathlib import Path

import nemo_run as run

from jp_peft.records import layout as rundir
from jp_peft.data.blend import nemo_blend_paths
from jp_peft.spec import ExperimentSpec, StageSpec
from jp_peft.spec.stages import CHAT, previous_trained, stage as stage_row


def nemo_home() -> Path:
    return Path(os.environ.get("NEMO_HOME", Path.home() / ".cache" / "nemo"))


def hf_base_path(spec: ExperimentSpec) -> str:
    """The Hugging Face base (a hub id or a directory) the import stage makes available; known at compose time."""
    if spec.model.tiny:
        from jp_peft.tiny import tiny_base_path

        return str(tiny_base_path())
    return spec.model.name


def imported_base_path(spec: ExperimentSpec) -> Path:
    """Where the import stage puts the NeMo checkpoint: NeMo's own layout, NEMO_HOME/models/<hub id>,
    so that `nemo://Qwen/Qwen2.5-0.5B` finds it; a local HF directory imports as local/<dir name>."""
    name = hf_base_path(spec)
    local = Path(name)
    key = f"local/{local.name}" if local.is_absolute() or local.exists() else name
    return nemo_home() / "models" / key


def model_config(spec: ExperimentSpec) -> run.Config:
    """The NeMo model config class the spec names (Qwen25Config500M), sized like the tiny base if it is the tiny one."""
    from nemo.collections import llm

    config = run.Config(getattr(llm, spec.model.nemo_config))
    if spec.model.tiny:
        apply_hf_shape(config, _tiny_hf_config())
    return config


def _tiny_hf_config() -> dict:
    from jp_peft.tiny import TINY_HF_CONFIG

    return TINY_HF_CONFIG


# Hugging Face config.json keys -> the NeMo GPTConfig fields they set (as NeMo's importer derives them, below)
HF_TO_NEMO_SHAPE = {"num_hidden_layers": "num_layers", "hidden_size": "hidden_size",
                    "intermediate_size": "ffn_hidden_size", "num_attention_heads": "num_attention_heads",
                    "num_key_value_heads": "num_query_groups", "vocab_size": "vocab_size"}


def nemo_config_shape(nemo_config: str) -> dict:
    """The shape fields of a nemo.collections.llm config class (e.g. Qwen25Config500M), by its defaults."""
    import dataclasses

    from nemo.collections import llm

    defaults = {f.name: f.default for f in dataclasses.fields(getattr(llm, nemo_config))
                if f.default is not dataclasses.MISSING}
    return {field: defaults[field] for field in HF_TO_NEMO_SHAPE.values() if field in defaults}


def apply_hf_shape(config: run.Config, hf: dict) -> None:
    """Size fields of a NeMo Qwen2 config from a Hugging Face config, exactly as NeMo's importer
    derives them (nemo/collections/llm/gpt/model/qwen2.py HFQwen2Importer.config), so that the
    recipe's model restores the imported checkpoint."""
    config.num_layers = hf["num_hidden_layers"]
    config.hidden_size = hf["hidden_size"]
    config.ffn_hidden_size = hf["intermediate_size"]
    config.num_attention_heads = hf["num_attention_heads"]
    config.num_query_groups = hf["num_key_value_heads"]
    config.init_method_std = hf["initializer_range"]
    config.layernorm_epsilon = hf["rms_norm_eps"]
    config.rotary_base = hf["rope_theta"]
    config.vocab_size = hf["vocab_size"]
    config.seq_length = hf["max_position_embeddings"]
    config.share_embeddings_and_output_weights = False  # the importer copies lm_head into the output layer


def use_cpu(recipe: run.Partial, spec: ExperimentSpec, stage: str) -> None:
    """Device fields for NeMo's Megatron path on CPU (backends/megatron/cpu.py gets past the rest)."""
    recipe.trainer.accelerator = "cpu"  # each of cluster.gpus_per_node "GPUs" is a gloo rank
    recipe.model.config.use_cpu_initialization = True
    recipe.model.config.masked_softmax_fusion = False  # the fused softmax is a CUDA kernel
    # megatron's torch AdamW fallback (no TE/Apex fused Adam) keeps a 0-dim `step` per parameter, which
    # the default dp_reshardable optimizer checkpoint asserts on (distrib_optimizer.py:1646)
    recipe.trainer.strategy.ckpt_optim_fully_reshardable = True
    recipe.trainer.strategy.distrib_optim_fully_reshardable_mem_efficient = True
    # Saves write in this process: the async writer is a forked child in the stage's process group, which a
    # stop (SIGTERM to the group) would kill mid-write, leaving the preemption checkpoint unfinished
    recipe.trainer.strategy.ckpt_async_save = False
    # Each rank reads its own shards: the fully parallel load splits reads across ranks and exchanges the
    # tensors through CUDA buffers (megatron/core/dist_checkpointing/exchange_utils.py:101-113, :502)
    recipe.trainer.strategy.ckpt_parallel_load = False
    # Gradient reduction and parameter gathers run inside the step, in order: the overlapped (asynchronous)
    # ones hung two gloo ranks at a step's end
    from megatron.core.distributed import DistributedDataParallelConfig

    recipe.trainer.strategy.ddp = run.Config(DistributedDataParallelConfig, overlap_grad_reduce=False,
                                             overlap_param_gather=False, check_for_nan_in_grad=True,
                                             use_distributed_optimizer=True)
    recipe.data.num_workers = 0  # two cores: loader workers would only compete with the training process
    if stage_row(stage).data_kind == CHAT:  # packed (THD) attention is Transformer Engine only: unpacked, micro batches as in the spec
        recipe.data.packed_sequence_specs = None
        recipe.data.micro_batch_size = spec.sft.train.micro_batch_size


def apply_training(recipe: run.Partial, spec: ExperimentSpec, stage: StageSpec) -> None:
    """Trainer, strategy and optimiser fields of a composed finetune recipe, from the spec."""
    train, cluster = stage.train, spec.cluster
    trainer = recipe.trainer
    trainer.num_nodes = cluster.num_nodes
    trainer.devices = cluster.gpus_per_node
    trainer.max_steps = train.max_steps
    trainer.val_check_interval = train.val_check_interval
    # Validation every val_check_interval optimizer steps counted over the whole run, not per epoch: a
    # resumed fine-tuning stage's loader holds only the remaining steps, and Lightning refuses an interval
    # longer than that when it counts per epoch (fit_loop.setup_data: 'val_check_interval ... must be less
    # than or equal to the number of the training batches'); the hf backend counts the same way.
    trainer.check_val_every_n_epoch = None
    trainer.limit_val_batches = train.limit_val_batches
    # No trainer.gradient_clip_val: NeMo's MegatronMixedPrecision.clip_gradients raises on it at the
    # first optimizer step; Megatron clips inside its optimizer (optim.config.clip_grad below).
    trainer.strategy.tensor_model_parallel_size = cluster.tensor_parallel
    trainer.strategy.pipeline_model_parallel_size = cluster.pipeline_parallel
    trainer.strategy.context_parallel_size = cluster.context_parallel
    trainer.plugins = precision_plugin(train.precision)
    optim = recipe.optim
    optim.config.lr = train.lr
    optim.config.weight_decay = train.weight_decay
    optim.config.clip_grad = train.grad_clip
    # the optimizer's main-parameter dtype follows the training precision (NVIDIA's default is bf16)
    optim.config.bf16 = train.precision.startswith("bf16")
    optim.config.fp16 = train.precision == "16-mixed"
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


def tokenizer(spec: ExperimentSpec) -> run.Config:
    """The base model's own tokenizer for the data modules. Without one, PreTrainingDataModule
    downloads GPT-2's vocabulary in __init__ (pre_training.py:260), which fails offline."""
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

    return run.Config(AutoTokenizer, pretrained_model_name=hf_base_path(spec))


def callbacks(spec: ExperimentSpec, stage: str) -> list[run.Config]:
    """jp-peft's per-step metrics (throughput, MFU, progress) and per-language validation, the method's
    callbacks (embed_lr, early stopping), and NeMo's PreemptionCallback: SIGTERM (Slurm preemption, scancel,
    Ctrl-C at the launcher) saves the last checkpoint at the end of the current step and stops, so the same
    command resumes."""
    from nemo.lightning.pytorch.callbacks import PreemptionCallback

    from jp_peft.backends.megatron.methods import embed_lr_ratio
    from jp_peft.training.early_stopping import EarlyStopping
    from jp_peft.backends.megatron.embed_lr import EmbedLearningRate
    from jp_peft.training.flops import QWEN25_05B, method_flops_per_token, shape_of_hf_dict
    from jp_peft.backends.megatron.language_validation import LanguageValidation
    from jp_peft.backends.megatron.resumed_epoch import ResumedEpochFromZero
    from jp_peft.training.step_seed import StepSeed
    from jp_peft.training.step_metrics import MegatronStepMetrics

    stage_spec = spec.stage(stage)
    data, train = stage_spec.data, stage_spec.train
    shape = shape_of_hf_dict(_tiny_hf_config()) if spec.model.tiny else QWEN25_05B
    flops = method_flops_per_token(shape, data.seq_length, stage_spec.method, spec.lora.rank, spec.lora.target_modules)
    log = str(rundir.train_log(spec, stage))
    ratio = embed_lr_ratio(spec, stage)
    return [
        run.Config(StepSeed, seed=train.seed, megatron=True),
        run.Config(ResumedEpochFromZero),  # a resumed fine-tuning loader trains each left batch once
        *([run.Config(EmbedLearningRate, ratio=ratio)] if ratio is not None else []),
        run.Config(MegatronStepMetrics, log_path=log, tokens_per_step=train.global_batch_size * data.seq_length,
                   flops_per_token=flops, stage=stage, method=stage_spec.method),
        run.Config(LanguageValidation, prefixes={"ja": data.val_ja, "en": data.val_en}, seq_length=data.seq_length,
                   max_blocks=train.limit_val_batches * train.micro_batch_size,
                   every_n_steps=train.val_check_interval, log_path=log,
                   baseline_path=str(rundir.val_baseline(spec, stage)),
                   checkpoint_dir=str(rundir.nemo_checkpoints(spec, stage)),
                   tokens_per_step=train.global_batch_size * data.seq_length),
        # after LanguageValidation: it reads the row that callback wrote at the same step
        *([run.Config(EarlyStopping, patience=train.early_stopping_patience, min_delta=train.early_stopping_min_delta)]
          if train.early_stopping_patience else []),
        # last: it saves and exits the process at the end of a step, after the rows above are written
        run.Config(PreemptionCallback),
    ]


def cpt_data(spec: ExperimentSpec) -> run.Config:
    """Megatron's PreTrainingDataModule over the weighted blend; NeMo's own validation on held-out Japanese."""
    from nemo.collections import llm

    from jp_peft.backends.megatron.data import ExactResumeGPTDataset

    data, train = spec.cpt.data, spec.cpt.train
    return run.Config(
        llm.PreTrainingDataModule,
        paths={"train": nemo_blend_paths(list(data.blend)), "validation": [data.val_ja], "test": [data.val_ja]},
        seq_length=data.seq_length, micro_batch_size=train.micro_batch_size,
        global_batch_size=train.global_batch_size, seed=train.seed, num_workers=2,
        tokenizer=tokenizer(spec), dataset_cls=ExactResumeGPTDataset,
        index_mapping_dir=str(rundir.index_cache(spec)),
    )


def sft_data(spec: ExperimentSpec) -> run.Config:
    """NeMo's FineTuningDataModule on the prepared ChatML input/output JSONL, packed to seq_length."""
    from nemo.collections import llm
    from nemo.collections.llm.gpt.data.packed_sequence import PackedSequenceSpecs

    data, train = spec.sft.data, spec.sft.train
    packing = run.Config(PackedSequenceSpecs, packed_sequence_size=data.seq_length) if data.packing else None
    config = run.Config(
        llm.FineTuningDataModule,
        dataset_root=str(Path(data.sft_train).parent), seq_length=data.seq_length,
        micro_batch_size=1 if data.packing else train.micro_batch_size,  # packed: one pack per micro batch
        global_batch_size=train.global_batch_size, seed=train.seed, packed_sequence_specs=packing,
        tokenizer=tokenizer(spec),
        # The prepared input ends with "<|im_start|>assistant\n" and the output with "<|im_end|>":
        # concatenate them as they are, and let the loss fall on the output only.
        dataset_kwargs={"prompt_template": "{input}{output}", "label_key": "output", "truncation_field": "input",
                        "add_bos": False, "add_eos": False, "answer_only_loss": True},
    )
    return config


def logger(spec: ExperimentSpec, stage: str) -> run.Config:
    """NeMoLogger with TensorBoard and W&B (group = experiment, job_type = stage), checkpoints every N steps."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
    from nemo import lightning as nl

    train = spec.stage(stage).train
    ckpt = run.Config(nl.ModelCheckpoint, save_last=True, save_top_k=-1, every_n_train_steps=train.ckpt_every_n_steps,
                      filename="{model_name}--{step}-{consumed_samples}", save_optim_on_train_end=True)
    from jp_peft.training.wandb_run import run_identity

    wandb = None
    if spec.wandb.enabled:
        wandb = run.Config(WandbLogger, **run_identity(spec, stage), save_dir=str(spec.run_dir))
    log_dir = rundir.nemo_log_dir(spec, stage)
    return run.Config(nl.NeMoLogger, name=log_dir.name, log_dir=str(log_dir.parent), use_datetime_version=False,
                      ckpt=ckpt, tensorboard=run.Config(TensorBoardLogger, save_dir="tb_logs", name=stage), wandb=wandb)


def resume(restore_from: str) -> run.Config:
    """Resume this stage's own last checkpoint if there is one (a requeued job), else start from
    `restore_from` (the imported base, or the merged CPT model for SFT)."""
    from nemo import lightning as nl

    return run.Config(nl.AutoResume, restore_config=run.Config(nl.RestoreConfig, path=restore_from),
                      resume_if_exists=True, resume_ignore_no_checkpoint=True)


def stage_start_nemo(spec: ExperimentSpec, stage: str) -> Path:
    """The NeMo checkpoint a trained stage restores: the imported base, or the merged checkpoint of the trained
    stage it follows (the stage table's starts_from: SFT after CPT)."""
    previous = previous_trained(stage, spec.stages)
    return rundir.nemo_merged(spec, previous) if previous is not None else imported_base_path(spec)

"""The Hugging Face backend: the spec's trained stage with transformers + peft + Lightning.

Runs on CPU or one GPU (bf16 where the GPU has it). Same spec, same prepared data and the
same outputs as the Megatron backend: hf_adapter/, hf_merged/, metrics.json. What each method
trains and exports is backends/hf/methods.py.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from jp_peft.backends.hf import methods as hf_methods
from jp_peft.backends.hf.data import BlendedBlocks, SFTDataset, packed_attention_mask
from jp_peft.data.blocks import EvalBlocks
from jp_peft.records import layout as rundir
from jp_peft.records.metrics import LANGUAGES, STEP, StageMetrics, params_record, validation_row
from jp_peft.spec import ExperimentSpec, LoraSpec, TrainSpec
from jp_peft.spec.stages import BLEND, CHAT, stage as stage_row
from jp_peft.training.interrupt import StageInterrupted
from jp_peft.training.ranks import is_rank_zero


def resolve_precision(requested: str) -> str:
    """bf16 only where the hardware has it; CPUs train in fp32 (bf16 autocast there is slower, not faster)."""
    if requested.startswith("bf16") and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        return "32-true"
    return requested


class OffsetSampler(torch.utils.data.Sampler):
    """Indices from `start()` to the end, in order. `start` is read when iteration begins, after
    Lightning has restored a checkpoint: a resumed run starts at global_step * global_batch_size."""

    def __init__(self, length: int, start):
        self.length, self.start = length, start

    def __iter__(self):
        return iter(range(self.start(), self.length))

    def __len__(self) -> int:
        return self.length - self.start()


class TrainedStageModule(pl.LightningModule):
    """One trained stage of any method: `model` is a PeftModel, or the plain model under method full."""

    def __init__(self, base_dir: str, lora: LoraSpec, train_spec: TrainSpec, train_set: Dataset,
                 val_sets: dict[str, Dataset], dtype: torch.dtype = torch.float32, method: str = "lora", model_spec=None):
        super().__init__()
        self.method = method
        self.model = hf_methods.build_model(base_dir, method, lora, dtype, model_spec)
        self.train_spec = train_spec
        self.train_set, self.val_sets = train_set, val_sets
        self.val_names = list(val_sets)
        self.base_val: dict[str, float] = {}
        self.val_history: list[dict[str, Any]] = []
        self.last_batch_tokens = 0
        self.last_grad_norm = float("nan")
        self.consumed_tokens = 0
        self.automatic_optimization = False  # accumulation and clipping in training_step, see there
        # Only trained weights go into checkpoints; the frozen base is reloaded from base_dir.
        self.strict_loading = False

    # --- data --------------------------------------------------------------------------
    def train_dataloader(self):
        # One loader batch is one optimizer step (the whole global batch; training_step splits
        # it into micro batches), so a resumed run's position is exactly global_step batches in.
        def start() -> int:
            return self.trainer.global_step * self.train_spec.global_batch_size

        return DataLoader(self.train_set, batch_size=self.train_spec.global_batch_size,
                          sampler=OffsetSampler(len(self.train_set), start), num_workers=0)

    def val_dataloader(self):
        return [DataLoader(self.val_sets[name], batch_size=self.train_spec.micro_batch_size, num_workers=0)
                for name in self.val_names]

    # --- steps -------------------------------------------------------------------------
    def forward_loss(self, batch) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over the labelled tokens, and their count."""
        kwargs = {"input_ids": batch["input_ids"]}
        if "segment_ids" in batch:  # packed SFT: block-diagonal causal mask, positions restart per example
            kwargs["attention_mask"] = packed_attention_mask(batch["segment_ids"], self.model.dtype)
            kwargs["position_ids"] = batch["position_ids"]
        logits = self.model(**kwargs).logits.float()
        labels = batch["labels"]
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
        return loss, int((labels != -100).sum())

    def training_step(self, batch, batch_idx):
        """Gradient accumulation over micro batches, loss weighted by labelled tokens, clipping, one step.

        Data parallel (DDP, several ranks): every rank loads the whole global batch (the sampler is the one
        process's, so a resumed run's position is the same) and trains its own contiguous share of the micro
        batches. The weights are the labelled tokens over the whole global batch, and the loss is scaled by the
        world size because DDP averages the gradients over ranks: the sum is what one process accumulates."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        micro = self.train_spec.micro_batch_size
        world, rank = self.trainer.world_size, self.trainer.global_rank
        total_labels = int((batch["labels"] != -100).sum())
        rows = batch["input_ids"].shape[0]
        share = rows // world  # validate() makes the global batch a multiple of micro batch x ranks
        mine = {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}
        step_loss = torch.zeros((), device=self.device)
        for start in range(0, share, micro):
            micro_batch = {k: v[start:start + micro] for k, v in mine.items()}
            loss, count = self.forward_loss(micro_batch)
            weighted = loss * (count / max(total_labels, 1))
            # Lightning's DDP prepares the reducer at each manual_backward: every micro batch's gradient is
            # averaged over the ranks and added to the accumulated (already averaged) one
            self.manual_backward(weighted * world)
            step_loss += weighted.detach()
        if world > 1:  # the step's loss over the whole global batch, as one process logs it
            import torch.distributed as dist

            dist.all_reduce(step_loss)
        params = [p for p in self.parameters() if p.requires_grad]
        max_norm = self.train_spec.grad_clip if self.train_spec.grad_clip > 0 else float("inf")
        self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))  # norm before clipping
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        real = batch["segment_ids"] > 0 if "segment_ids" in batch else torch.ones_like(batch["input_ids"], dtype=torch.bool)
        self.last_batch_tokens = int(real.sum())
        return step_loss

    def on_validation_epoch_start(self):
        self._val_sums = {name: [0.0, 0] for name in self.val_names}

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        loss, count = self.forward_loss(batch)
        acc = self._val_sums[self.val_names[dataloader_idx]]
        acc[0] += float(loss) * count
        acc[1] += count

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            return
        losses = {name: total / max(count, 1) for name, (total, count) in self._val_sums.items()}
        row = validation_row(self.trainer.global_step, losses, self.base_val, self.consumed_tokens)
        self.val_history.append(row)
        for logger in self.trainer.loggers:
            logger.log_metrics({k: v for k, v in row.items() if k != STEP}, step=self.trainer.global_step)

    @torch.no_grad()
    def evaluate(self, name: str, disable_adapter: bool = False) -> float:
        """Validation loss on one held-out set, optionally with the adapter off (= the base model)."""
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        loader = DataLoader(self.val_sets[name], batch_size=self.train_spec.micro_batch_size)
        off = disable_adapter and hf_methods.is_peft(self.model)
        ctx = self.model.disable_adapter() if off else contextlib.nullcontext()
        with ctx:
            for batch in loader:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                loss, n = self.forward_loss(batch)
                total += float(loss) * n
                count += n
        self.model.train(was_training)
        return total / max(count, 1)

    # --- optimisation ------------------------------------------------------------------
    def configure_optimizers(self):
        spec = self.train_spec
        groups = hf_methods.param_groups(self.model, self.method, spec)
        optim = torch.optim.AdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98), eps=1e-5)

        def cosine_with_warmup(step: int) -> float:
            if step < spec.warmup_steps:
                return (step + 1) / (spec.warmup_steps + 1)
            progress = min(1.0, (step - spec.warmup_steps) / max(1, spec.max_steps - spec.warmup_steps))
            floor = spec.min_lr / spec.lr  # a factor: every group (embed_lr too) decays to the same share
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(optim, cosine_with_warmup)
        return {"optimizer": optim, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- checkpoints hold the adapter only ---------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["jp_peft"] = {"base_val": self.base_val, "val_history": self.val_history,
                                 "consumed_tokens": self.consumed_tokens}

    def on_load_checkpoint(self, checkpoint):
        extra = checkpoint.get("jp_peft", {})
        self.base_val = extra.get("base_val", {})
        self.val_history = extra.get("val_history", [])
        self.consumed_tokens = extra.get("consumed_tokens", 0)


def build_datasets(spec: ExperimentSpec, stage: str, tokenizer):
    """Training set and {ja, en} validation sets of a stage, from the prepared files its spec names."""
    stage_spec = spec.stage(stage)
    data, train = stage_spec.data, stage_spec.train
    num_samples = train.max_steps * train.global_batch_size
    kind = stage_row(stage).data_kind
    if kind == BLEND:
        train_set = BlendedBlocks([b.prefix for b in data.blend], data.blend_weights(), data.seq_length, num_samples,
                                  train.seed)
    elif kind == CHAT:
        train_set = SFTDataset(data.sft_train, tokenizer, data.seq_length, num_samples, train.seed,
                               data.packing, tokenizer.pad_token_id or tokenizer.eos_token_id)
    else:  # a stage of another data kind trains elsewhere, never silently as one of these
        raise ValueError(f"{stage}: the hf trainer has no dataset for data kind {kind!r}")
    val_sets = {lang: EvalBlocks(getattr(data, f"val_{lang}"), data.seq_length,
                                 train.limit_val_batches * train.micro_batch_size) for lang in LANGUAGES}
    return train_set, val_sets


def ranks_of(spec: ExperimentSpec) -> dict:
    """The trainer's devices, nodes and strategy. Several ranks (cluster.num_nodes x gpus_per_node > 1) are
    DDP processes that torchrun started (run/plan.py), one per device: NCCL between GPUs, gloo between CPU
    processes (the multi-rank CPU tier)."""
    import os

    world = spec.cluster.world_size
    started = int(os.environ.get("WORLD_SIZE", "1"))
    if started != world:
        raise RuntimeError(f"cluster: the spec asks for {world} rank(s) (num_nodes x gpus_per_node) but the launcher "
                           f"started {started}: run the stage through the experiment (it starts torchrun)")
    if world == 1:
        return {"devices": 1}
    from lightning.pytorch.strategies import DDPStrategy

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    return {"devices": spec.cluster.gpus_per_node, "num_nodes": spec.cluster.num_nodes,
            "strategy": DDPStrategy(process_group_backend=backend)}


def train_stage(spec: ExperimentSpec, stage: str, base_dir: str, loggers: list):
    """Train one stage; returns (StageMetrics, the trained model (PeftModel unless method full), the tokenizer)."""
    from transformers import AutoTokenizer

    from jp_peft.training.early_stopping import EarlyStopping, fired
    from jp_peft.training.flops import model_flops_per_token
    from jp_peft.training.preemption import PreemptionCheckpoint
    from jp_peft.training.step_metrics import StepMetrics
    from jp_peft.training.step_seed import StepSeed

    stage_spec = spec.stage(stage)
    train = stage_spec.train
    pl.seed_everything(train.seed, workers=True, verbose=False)
    torch.use_deterministic_algorithms(False)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train_set, val_sets = build_datasets(spec, stage, tokenizer)
    precision = resolve_precision(train.precision)
    module = TrainedStageModule(base_dir, spec.lora, train, train_set, val_sets, method=stage_spec.method,
                                model_spec=spec.model)
    trainable, total = hf_methods.count_params(module.model)

    for logger in loggers:
        logger.log_hyperparams(params_record(trainable, total, stage_spec.method))
    stage_dir, ckpt_dir, train_log = rundir.stage_dir(spec, stage), rundir.trainer_checkpoints(spec, stage), \
        rundir.train_log(spec, stage)
    last = rundir.trainer_last_checkpoint(spec, stage)
    resume_from = last if last.exists() else None
    if resume_from is None:  # the base's own perplexities, before any training of this stage
        module.base_val = {lang: module.evaluate(lang, disable_adapter=True) for lang in val_sets}
        if is_rank_zero():
            train_log.unlink(missing_ok=True)

    step_metrics = StepMetrics(train_log, model_flops_per_token(module.model, stage_spec), stage)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="step={step:06d}", auto_insert_metric_name=False,
                                              every_n_train_steps=train.ckpt_every_n_steps, save_top_k=-1, save_last=True)
    early_stop = [EarlyStopping(train.early_stopping_patience, train.early_stopping_min_delta)] \
        if train.early_stopping_patience else []
    trainer = pl.Trainer(
        accelerator="auto", precision=precision, max_steps=train.max_steps, max_epochs=-1, **ranks_of(spec),
        val_check_interval=train.val_check_interval, check_val_every_n_epoch=None,
        limit_val_batches=train.limit_val_batches, num_sanity_val_steps=0, logger=loggers or False,
        # StepSeed: each step's dropout masks are a function of (seed, step), so a resumed stage draws
        # what the uninterrupted one drew (the RNG state is not in the checkpoint, and validation draws too)
        callbacks=[StepSeed(train.seed), step_metrics, checkpoint, PreemptionCheckpoint(last),
                   *early_stop],
        enable_progress_bar=sys.stderr.isatty(), enable_model_summary=False, default_root_dir=str(stage_dir),
        deterministic=False, use_distributed_sampler=False,
    )
    started = time.perf_counter()
    trainer.fit(module, ckpt_path=str(resume_from) if resume_from else None)
    wall = time.perf_counter() - started
    stopped = fired(trainer.callbacks)
    if trainer.global_step < train.max_steps and stopped is None:
        raise StageInterrupted(stage, trainer.global_step, train.max_steps, ckpt_dir)

    final = {lang: module.evaluate(lang) for lang in val_sets}
    extra = {}
    if isinstance(train_set, BlendedBlocks):
        extra["blend_epochs"] = dict(zip([b.name for b in stage_spec.data.blend], train_set.epochs()))
    if spec.model.quantization:  # what the stage trained on (the export's parity figure is against this)
        extra["quantization"] = hf_methods.quantization_record(spec.model)
    metrics = StageMetrics.from_train_log(
        train_log, stage=stage, backend="hf", steps=trainer.global_step, base_model=base_dir,
        base_val_loss_ja=module.base_val["ja"], base_val_loss_en=module.base_val["en"],
        val_loss_ja=final["ja"], val_loss_en=final["en"],
        trainable_params=trainable, total_params=total, wall_seconds=wall, precision=precision,
        resumed_from=str(resume_from) if resume_from else None, val_history=module.val_history, extra=extra,
        method=stage_spec.method, early_stopped_at_step=stopped.stopped_at_step if stopped else None,
        stop_reason=stopped.stop_reason if stopped else None)
    module.model.eval()
    return metrics, module.model, tokenizer


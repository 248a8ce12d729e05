"""The dpo stage on the Hugging Face backend: TRL's DPOTrainer from the model the stage starts from.

The policy is that model (SFT's merged model, stage table: starts_from) with a new LoRA adapter of the spec's
shape; the reference is the same model with the adapter off (TRL's PEFT path: no second copy in memory).
What every trained stage has, the dpo stage has too, through the Hugging Face Trainer that TRL runs:
train_log.jsonl rows with the keys of records/metrics.py and the progress line of records/progress.py, the
W&B run identity (training/wandb_run: the same WandbLogger, stepped on trainer/global_step), each step's
dropout seeded by (seed, step) as training/step_seed does, a stop on
SIGTERM/SIGUSR1/SIGINT that saves a checkpoint and raises StageInterrupted, resume from the newest
checkpoint in STAGE/checkpoints/, and the JA/EN held-out losses before and after. At every validation TRL
measures the implicit reward of chosen and rejected on the validation pairs: its accuracy (chosen above
rejected) and margin go into the validation rows, and their values before the first step and after the
last into metrics.json (StageMetrics.extra).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from jp_peft.backends.hf import methods as hf_methods
from jp_peft.data.chat import load_pairs
from jp_peft.data.blocks import EvalBlocks
from jp_peft.records import layout as rundir
from jp_peft.records.metrics import (CONSUMED_TOKENS, LANGUAGES, REWARD_ACCURACY, REWARD_MARGIN, STEP, STEP_TIME,
                                     TOKENS_PER_S, TRAIN_LOSS, StageMetrics, params_record, read_train_log,
                                     validation_row)
from jp_peft.records.progress import progress_line
from jp_peft.spec import ExperimentSpec
from jp_peft.training.interrupt import StageInterrupted
from jp_peft.training.step_metrics import peak_memory_mb, truncate_log

def last_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest complete Trainer checkpoint (checkpoint-N/ with its trainer_state.json), or None."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None


@torch.no_grad()
def held_out_losses(model, val_sets: dict[str, EvalBlocks], batch_size: int) -> dict[str, float]:
    """Token-mean cross-entropy on each held-out set (the same blocks and formula as the other stages)."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for lang, blocks in val_sets.items():
        total, count = 0.0, 0
        for batch in DataLoader(blocks, batch_size=batch_size):
            logits = model(input_ids=batch["input_ids"].to(device)).logits.float()
            labels = batch["labels"].to(device)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
            n = int((labels != -100).sum())
            total, count = total + float(loss) * n, count + n
        out[lang] = total / max(count, 1)
    model.train(was_training)
    return out


def reward_row(metrics: dict[str, float]) -> dict[str, float]:
    """TRL's evaluation metrics as our validation keys: reward accuracy and margin on the validation pairs."""
    return {"val/dpo_loss": metrics["eval_loss"], REWARD_ACCURACY: metrics["eval_rewards/accuracies"],
            REWARD_MARGIN: metrics["eval_rewards/margins"]}


class StageRecords(TrainerCallback):
    """train_log.jsonl rows, progress lines and W&B metrics of the Trainer's steps and validations, as
    training/step_metrics.StepMetrics writes them for the Lightning stages; the held-out JA/EN losses at every
    validation beside the reward accuracy and margin."""

    def __init__(self, stage: str, log_path: Path, loggers: list, global_batch: int, val_sets, micro: int,
                 baseline: dict[str, float]):
        self.stage, self.log_path, self.loggers = stage, log_path, loggers
        self.global_batch, self.val_sets, self.micro, self.baseline = global_batch, val_sets, micro, baseline
        self.step_seconds: list[float] = []
        self.step_start = None
        self.tokens_seen = 0  # TRL's num_tokens counts from this process's start
        self.consumed_tokens = 0
        self.val_history: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run forgets the rows after its checkpoint (they are trained again): no step appears twice.
        truncate_log(self.log_path, state.global_step)
        rows = read_train_log(self.log_path) if self.log_path.exists() else []
        steps = [r for r in rows if TRAIN_LOSS in r]
        self.consumed_tokens = steps[-1][CONSUMED_TOKENS] if steps else 0
        self.val_history = [r for r in rows if REWARD_ACCURACY in r]

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs and "eval_loss" in logs:  # TRL's log() adds the rewards to the evaluation's logs, not to on_evaluate's
            self._validation(state, logs, model)
            return
        if not logs or "loss" not in logs or self.step_start is None:
            return  # the Trainer's end-of-training summary has no step
        seconds = max(time.perf_counter() - self.step_start, 1e-9)
        self.step_start = None
        tokens = int(logs.get("num_tokens", 0)) - self.tokens_seen
        self.tokens_seen += tokens
        self.consumed_tokens += tokens
        row = {STEP: state.global_step, TRAIN_LOSS: float(logs["loss"]), "train/lr": float(logs["learning_rate"]),
               "train/grad_norm": float(logs["grad_norm"]) if "grad_norm" in logs else None,
               "train/dpo_reward_accuracy": logs.get("rewards/accuracies"),
               "train/dpo_reward_margin": logs.get("rewards/margins"),
               STEP_TIME: seconds, TOKENS_PER_S: tokens / seconds, "perf/samples_per_s": self.global_batch / seconds,
               CONSUMED_TOKENS: self.consumed_tokens, "perf/consumed_samples": state.global_step * self.global_batch,
               "perf/peak_memory_mb": peak_memory_mb()}
        self.step_seconds.append(seconds)
        self._write(row)
        print(progress_line(self.stage, state.global_step, state.max_steps, row[TRAIN_LOSS], row[TOKENS_PER_S],
                            self.step_seconds), flush=True)

    def _validation(self, state, metrics: dict, model) -> None:
        row = validation_row(state.global_step, held_out_losses(model, self.val_sets, self.micro), self.baseline)
        row.update(reward_row(metrics))
        self.val_history.append(row)
        self._write(row)
        print(f"[jp-peft] {self.stage} validation at step {state.global_step}: reward accuracy "
              f"{row[REWARD_ACCURACY]:.3f}, margin {row[REWARD_MARGIN]:+.4f}", flush=True)

    def _write(self, row: dict) -> None:
        assert all(v is None or math.isfinite(v) for v in row.values()), f"non-finite metric: {row}"
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        for logger in self.loggers:
            logger.log_metrics({k: v for k, v in row.items() if k != STEP and v is not None}, step=row[STEP])


class StopOnSignal(TrainerCallback):
    """SIGTERM (scancel, preemption), SIGUSR1 (Slurm's warning before the time limit) or SIGINT (Ctrl-C): the
    next optimizer-step boundary saves a checkpoint and stops, as training/preemption.py does for the
    Lightning stages; after SIGUSR1 under Slurm the job requeues itself."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        self.received = signum

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is None:
            return
        control.should_save = True
        control.should_training_stop = True
        print(f"jp-peft: received {signal.Signals(self.received).name}: saving a checkpoint at step "
              f"{state.global_step}, stopping", flush=True)
        job = os.environ.get("SLURM_JOB_ID")
        if self.received == signal.SIGUSR1 and job:
            subprocess.run(["scontrol", "requeue", job], check=False)

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class StepSeedEachStep(TrainerCallback):
    """Each optimizer step's random draws (LoRA dropout) from torch's generator seeded by (seed, step), as
    training/step_seed.StepSeed does for the Lightning stages: a resumed stage draws what the uninterrupted
    one drew, whatever the dataloaders and validations drew in between."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_step_begin(self, args, state, control, **kwargs):
        from jp_peft.training.step_seed import step_seed

        torch.manual_seed(step_seed(self.seed, 0, state.global_step))


def dpo_config(spec: ExperimentSpec, stage: str, output_dir: Path, precision: str):
    """TRL's DPOConfig from the stage's spec: the same optimiser, schedule, batch and checkpoint cadence."""
    from trl import DPOConfig

    stage_spec = spec.stage(stage)
    train = stage_spec.train
    on_gpu = torch.cuda.is_available()
    return DPOConfig(
        output_dir=str(output_dir), max_steps=train.max_steps, per_device_train_batch_size=train.micro_batch_size,
        per_device_eval_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.global_batch_size // train.micro_batch_size,
        learning_rate=train.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": train.min_lr},
        warmup_steps=train.warmup_steps, weight_decay=train.weight_decay, max_grad_norm=train.grad_clip,
        adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-5,  # the Lightning stages' AdamW
        eval_strategy="steps", eval_steps=train.val_check_interval, save_strategy="steps",
        save_steps=train.ckpt_every_n_steps, logging_steps=1, seed=train.seed, data_seed=train.seed,
        bf16=on_gpu and precision.startswith("bf16"), fp16=on_gpu and precision.startswith("16"), use_cpu=not on_gpu,
        report_to=[], disable_tqdm=not sys.stderr.isatty(), dataloader_num_workers=0, save_only_model=False,
        beta=stage_spec.beta, loss_type=[stage_spec.loss_type], max_length=stage_spec.data.seq_length,
        disable_dropout=False,  # lora.dropout as the other stages train with it
    )


def train_dpo_stage(spec: ExperimentSpec, stage: str, base_dir: str, loggers: list):
    """Train the dpo stage; returns (StageMetrics, the trained PeftModel, the tokenizer)."""
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, set_seed
    from trl import DPOTrainer

    from jp_peft.backends.hf.trainer import resolve_precision

    stage_spec = spec.stage(stage)
    train, data = stage_spec.train, stage_spec.data
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_pairs = Dataset.from_list(load_pairs(data.train))
    val_pairs = Dataset.from_list(load_pairs(data.validation, train.limit_val_batches * train.micro_batch_size))
    val_sets = {lang: EvalBlocks(getattr(data, f"val_{lang}"), data.seq_length,
                                 train.limit_val_batches * train.micro_batch_size) for lang in LANGUAGES}
    precision = resolve_precision(train.precision)
    model = hf_methods.load_base(base_dir, torch.float32, spec.model)  # 4-bit under model.quantization (QLoRA)

    ckpt_dir, train_log = rundir.trainer_checkpoints(spec, stage), rundir.train_log(spec, stage)
    resume_from = last_checkpoint(ckpt_dir)
    baseline_file = rundir.val_baseline(spec, stage)
    if resume_from is None or not baseline_file.exists():  # the starting model, before any step of this stage
        train_log.unlink(missing_ok=True)
        base_val = held_out_losses(model, val_sets, train.micro_batch_size)
        rundir.write_json(baseline_file, base_val)
    base_val = rundir.read_json(baseline_file, f"{stage}'s starting losses")

    records = StageRecords(stage, train_log, loggers, train.global_batch_size, val_sets, train.micro_batch_size,
                           base_val)
    stop = StopOnSignal()
    set_seed(train.seed)  # DPOTrainer adds the LoRA adapter (its random A) before the Trainer seeds anything
    trainer = DPOTrainer(model=model, args=dpo_config(spec, stage, ckpt_dir, precision), train_dataset=train_pairs,
                         eval_dataset=val_pairs, processing_class=tokenizer,
                         peft_config=hf_methods.lora_config(spec.lora),
                         callbacks=[records, stop, StepSeedEachStep(train.seed)])
    trainer.remove_callback(PrinterCallback)  # our progress lines instead of the Trainer's printed log dicts
    trainable, total = hf_methods.count_params(trainer.model)
    for logger in loggers:
        logger.log_hyperparams(params_record(trainable, total, stage_spec.method))
    if resume_from is None:  # step 0: the policy is the reference, every reward 0
        trainer.evaluate()
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - started
    if trainer.state.global_step < train.max_steps:
        raise StageInterrupted(stage, trainer.state.global_step, train.max_steps, ckpt_dir)
    if not records.val_history or records.val_history[-1][STEP] != trainer.state.global_step:
        trainer.evaluate()  # the last step's rewards, when max_steps is not a multiple of val_check_interval
    model = trainer.model
    final = held_out_losses(model, val_sets, train.micro_batch_size)
    first, last = records.val_history[0], records.val_history[-1]
    extra = {"reward_accuracy_before": first[REWARD_ACCURACY], "reward_accuracy_after": last[REWARD_ACCURACY],
             "reward_margin_before": first[REWARD_MARGIN], "reward_margin_after": last[REWARD_MARGIN],
             "beta": stage_spec.beta, "loss_type": stage_spec.loss_type, "train_pairs": len(train_pairs),
             "validation_pairs": len(val_pairs)}
    if spec.model.quantization:  # what the stage trained on (the export's parity figure is against this)
        extra["quantization"] = hf_methods.quantization_record(spec.model)
    metrics = StageMetrics.from_train_log(
        train_log, stage=stage, backend="hf", steps=trainer.state.global_step, base_model=base_dir,
        base_val_loss_ja=base_val["ja"], base_val_loss_en=base_val["en"], val_loss_ja=final["ja"],
        val_loss_en=final["en"], trainable_params=trainable, total_params=total, wall_seconds=wall,
        precision=precision, resumed_from=resume_from, val_history=records.val_history, extra=extra,
        method=stage_spec.method)
    model.eval()
    return metrics, model, tokenizer

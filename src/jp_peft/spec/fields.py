"""The experiment spec: frozen dataclasses that both backends translate.

One spec drives every backend (jp_peft.backends). Every check that can fail before launch and
needs no backend lives here, in `__post_init__`, and names the offending field; what a backend
cannot do is its own `validate` (jp_peft.backends), run when the experiment is planned.

Longer than our other modules on purpose: one dataclass per spec section, each with its validation,
then the builder that turns nested dicts into them, so that this file reads as the spec's reference.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jp_peft.spec.stages import (BACKEND_NAMES, BLEND, CHAT, DEFAULT_STAGES, EXPORT, PREFERENCE, STAGES,
                                 TRAINED_STAGES, refusal, single_stage, stage as stage_row, trained_with)

# Hugging Face names of Qwen2's seven linear projections (the spec speaks these names;
# the Megatron backend translates them, see jp_peft.backends.megatron.lora_mapping).
HF_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BACKENDS = BACKEND_NAMES
ACCELERATORS = ("gpu", "cpu")
PRECISIONS = ("bf16-mixed", "16-mixed", "32", "32-true", "bf16-true")
# What a trained stage trains: LoRA on the projections (lora); LoRA plus the input embeddings and the
# output layer, at train.embed_lr (lora_embed); every parameter, no adapter (full).
METHODS = ("lora", "lora_embed", "full")
# The base model's weights as a trained stage loads them: None (the checkpoint's dtype) or nf4 (QLoRA:
# bitsandbytes 4-bit NormalFloat with double quantization, LoRA trained on top).
QUANTIZATIONS = (None, "nf4")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# TRL's DPO losses the dpo stage offers (trl 0.29 DPOConfig.loss_type): sigmoid is the DPO paper's.
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
              "apo_down")


class SpecError(ValueError):
    """A spec value is invalid; the message names the field."""


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise SpecError(f"{field_name}: {message}")


def _choice(value: str, choices: tuple[str, ...], field_name: str) -> None:
    _require(value in choices, field_name, f"{value!r} is not one of {', '.join(choices)}")


@dataclass(frozen=True)
class ModelSpec:
    """Which base model. `name` is a hub id or a local Hugging Face directory."""

    # a hub id, or a local Hugging Face directory (config.json, tokenizer, weights)
    name: str = "Qwen/Qwen2.5-0.5B"
    # Embedded tiny Qwen2 (built from files in the repo) instead of `name`.
    tiny: bool = False
    # NeMo model config class in nemo.collections.llm for the Megatron backend.
    nemo_config: str = "Qwen25Config500M"
    # null: the weights as the checkpoint has them; nf4: QLoRA (the base frozen in 4-bit NormalFloat with double
    # quantization, LoRA trained on top; hf backend, method lora)
    quantization: str | None = None
    # what the 4-bit layers compute in: float32, bfloat16 or float16; null: bfloat16 where the GPU has it, else float32
    quantization_compute_dtype: str | None = None

    def __post_init__(self):
        _require(bool(self.name), "model.name", "must not be empty")
        _require(self.quantization in QUANTIZATIONS, "model.quantization",
                 f"{self.quantization!r} is not one of null, {', '.join(q for q in QUANTIZATIONS if q)}")
        _require(self.quantization_compute_dtype in (None, *COMPUTE_DTYPES), "model.quantization_compute_dtype",
                 f"{self.quantization_compute_dtype!r} is not one of null, {', '.join(COMPUTE_DTYPES)}")
        _require(self.quantization_compute_dtype is None or self.quantization is not None,
                 "model.quantization_compute_dtype", "only with model.quantization (nf4)")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapter shape, in Hugging Face module names."""

    # LoRA rank r of every adapted projection
    rank: int = 32
    # LoRA alpha; the update is scaled by alpha/rank
    alpha: int = 16
    # dropout on the adapter's input (PEFT's lora_dropout)
    dropout: float = 0.1
    # the projections that get adapters (Qwen2's seven by default)
    target_modules: tuple[str, ...] = HF_LORA_TARGETS
    # NeMo applies dropout before the A projection ("pre"), as PEFT does.
    dropout_position: str = "pre"

    def __post_init__(self):
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        _require(isinstance(self.rank, int) and self.rank > 0, "lora.rank", f"must be a positive integer, got {self.rank!r}")
        _require(self.alpha > 0, "lora.alpha", f"must be positive, got {self.alpha!r}")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout!r}")
        _require(len(self.target_modules) > 0, "lora.target_modules", "must name at least one module")
        for name in self.target_modules:
            _require(name in HF_LORA_TARGETS, "lora.target_modules",
                     f"unknown module {name!r}; Qwen2 has {', '.join(HF_LORA_TARGETS)}")
        _require(len(set(self.target_modules)) == len(self.target_modules), "lora.target_modules", "has duplicates")
        _choice(self.dropout_position, ("pre",), "lora.dropout_position")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class BlendEntry:
    """One dataset of a weighted CPT blend: an indexed-dataset prefix, optionally built from `source`."""

    name: str
    weight: float
    prefix: str
    source: tuple[str, ...] = ()
    # "ja" applies the Japanese-ratio filter when preparing `source`; "en" (replay) does not.
    lang: str = "ja"

    def __post_init__(self):
        object.__setattr__(self, "source", tuple(self.source))
        _require(self.weight > 0, f"blend[{self.name}].weight", f"must be positive, got {self.weight!r}")
        _choice(self.lang, ("ja", "en", "any"), f"blend[{self.name}].lang")
        _require(self.prefix.endswith("_text_document"), f"blend[{self.name}].prefix",
                 f"{self.prefix!r} must end with _text_document (the name `jp-peft data prepare` writes)")


@dataclass(frozen=True)
class DataSpec:
    """Data of one stage. CPT reads `blend`; SFT reads `sft_train`/`sft_val` (chat JSONL).

    `val_ja` and `val_en` are indexed-dataset prefixes of held-out raw text, measured
    before and after every stage: the Japanese gain and the English forgetting.
    """

    # CPT: weighted indexed datasets (name, weight, prefix, source, lang), or a blend YAML path
    blend: tuple[BlendEntry, ...] = ()
    # SFT: the prepared training JSONL (Qwen ChatML input/output)
    sft_train: str | None = None
    # SFT: the prepared validation JSONL (optional)
    sft_val: str | None = None
    # SFT: raw files the data stage prepares into sft_train
    sft_source: tuple[str, ...] = ()
    # format of sft_source: chatml or alpaca
    sft_format: str = "chatml"
    # held-out Japanese indexed-dataset prefix (the gain)
    val_ja: str | None = None
    # raw text the data stage prepares into val_ja
    val_ja_source: tuple[str, ...] = ()
    # held-out English indexed-dataset prefix (the forgetting)
    val_en: str | None = None
    # raw text the data stage prepares into val_en
    val_en_source: tuple[str, ...] = ()
    # tokens per training sequence
    seq_length: int = 2048
    # SFT: pack several examples per sequence (Megatron: GPU only)
    packing: bool = True
    # English replay share of the CPT blend: when set, the weights become 1 - r for the Japanese (and
    # "any") entries and r for the English ones, each group split in its declared proportions; an entry
    # whose share is 0 is dropped (r=0: no replay). None: the blend's weights as declared.
    replay_ratio: float | None = None

    def __post_init__(self):
        blend = tuple(BlendEntry(**b) if isinstance(b, dict) else b for b in self.blend)
        if self.replay_ratio is not None:
            blend = _with_replay_ratio(blend, self.replay_ratio)
        object.__setattr__(self, "blend", blend)
        for name in ("sft_source", "val_ja_source", "val_en_source"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _require(self.seq_length >= 8, "data.seq_length", f"must be >= 8, got {self.seq_length}")
        _choice(self.sft_format, ("chatml", "alpaca"), "data.sft_format")
        names = [b.name for b in blend]
        _require(len(set(names)) == len(names), "data.blend", f"dataset names repeat: {names}")

    def blend_weights(self) -> list[float]:
        total = sum(b.weight for b in self.blend)
        return [b.weight / total for b in self.blend]


def _with_replay_ratio(blend: tuple[BlendEntry, ...], ratio: float) -> tuple[BlendEntry, ...]:
    """The blend reweighted to an English share of `ratio` (see DataSpec.replay_ratio)."""
    _require(0.0 <= ratio < 1.0, "data.replay_ratio", f"must be in [0, 1), got {ratio!r}")
    _require(len(blend) > 0, "data.replay_ratio", "there is no blend to reweight (only the cpt stage has one)")
    english = [b for b in blend if b.lang == "en"]
    other = [b for b in blend if b.lang != "en"]
    _require(bool(other), "data.replay_ratio", "the blend has no Japanese entry (lang ja or any) to keep")
    _require(ratio == 0 or bool(english), "data.replay_ratio",
             "the blend has no English entry (lang: en) to replay; add one or drop replay_ratio")
    groups = ((other, 1.0 - ratio), (english, ratio))
    if all(abs(sum(b.weight for b in group) - share) < 1e-9 for group, share in groups if share > 0) \
            and (ratio > 0 or not english):
        return blend  # already reweighted (a resolved spec read back): unchanged, so its fingerprint is too
    out = []
    for group, share in groups:
        total = sum(b.weight for b in group)
        out += [dataclasses.replace(b, weight=share * b.weight / total) for b in group if share > 0]
    order = {b.name: i for i, b in enumerate(blend)}  # keep the declared order (Megatron's blend is ordered)
    return tuple(sorted(out, key=lambda b: order[b.name]))


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation of one stage. Defaults: shared/seeds/000 section 10.1."""

    # optimizer steps of the stage
    max_steps: int = 1000
    # sequences per forward/backward on one device
    micro_batch_size: int = 4
    # sequences per optimizer step (micro x data-parallel x accumulation)
    global_batch_size: int = 16
    # peak learning rate (cosine schedule with warmup)
    lr: float = 1e-4
    # learning rate at the end of the cosine
    min_lr: float = 0.0
    # linear warmup steps
    warmup_steps: int = 100
    # AdamW weight decay
    weight_decay: float = 0.0
    # clip the gradient norm to this (0: off)
    grad_clip: float = 1.0
    # validate (JA and EN) every N steps
    val_check_interval: int = 100
    # validation batches per language
    limit_val_batches: int = 32
    # save a checkpoint every N steps (and at a stop)
    ckpt_every_n_steps: int = 100
    # bf16-mixed, 16-mixed, 32, 32-true or bf16-true (CPUs train in fp32)
    precision: str = "bf16-mixed"
    # data order, initialisation and each step's dropout seed
    seed: int = 1234
    # Learning rate of the input embeddings and output layer under method lora_embed (None: `lr`).
    # CPT guides train them 2-10x slower than the adapters: they move every token's representation.
    embed_lr: float | None = None
    # Stop the stage after this many validations without the Japanese validation loss improving by
    # more than `early_stopping_min_delta` (0: off, the stage runs max_steps).
    early_stopping_patience: int = 0
    # the improvement of the Japanese validation loss that counts (with early_stopping_patience)
    early_stopping_min_delta: float = 0.0

    def __post_init__(self):
        for name in ("max_steps", "micro_batch_size", "global_batch_size", "val_check_interval",
                     "limit_val_batches", "ckpt_every_n_steps"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, f"train.{name}", f"must be a positive integer, got {value!r}")
        _require(self.lr > 0, "train.lr", f"must be positive, got {self.lr}")
        _require(0 <= self.min_lr <= self.lr, "train.min_lr", f"must be in [0, lr], got {self.min_lr}")
        _require(0 <= self.warmup_steps < self.max_steps, "train.warmup_steps",
                 f"must be in [0, max_steps={self.max_steps}), got {self.warmup_steps}")
        _require(self.global_batch_size % self.micro_batch_size == 0, "train.global_batch_size",
                 f"{self.global_batch_size} is not divisible by micro_batch_size={self.micro_batch_size}")
        _require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0")
        _choice(self.precision, PRECISIONS, "train.precision")
        _require(self.embed_lr is None or self.embed_lr > 0, "train.embed_lr", f"must be positive, got {self.embed_lr}")
        _require(isinstance(self.early_stopping_patience, int) and self.early_stopping_patience >= 0,
                 "train.early_stopping_patience", f"must be an integer >= 0 (0: off), got {self.early_stopping_patience!r}")
        _require(self.early_stopping_patience == 0 or self.val_check_interval <= self.max_steps,
                 "train.early_stopping_patience", f"needs validations: val_check_interval={self.val_check_interval} "
                 f"is beyond max_steps={self.max_steps}")
        _require(self.early_stopping_min_delta >= 0, "train.early_stopping_min_delta",
                 f"must be >= 0, got {self.early_stopping_min_delta}")


@dataclass(frozen=True)
class ClusterSpec:
    """Parallel layout. data-parallel size = nodes x gpus / (tp x pp x cp)."""

    # nodes of a training stage
    num_nodes: int = 1
    # GPUs (ranks) per node
    gpus_per_node: int = 1
    # tensor-parallel size (Megatron)
    tensor_parallel: int = 1
    # pipeline-parallel size (Megatron)
    pipeline_parallel: int = 1
    # context-parallel size (Megatron)
    context_parallel: int = 1
    # "cpu" runs NeMo's Megatron path on CPU (the embedded tiny model only: the CI tier and --smoke)
    accelerator: str = "gpu"

    def __post_init__(self):
        _choice(self.accelerator, ACCELERATORS, "cluster.accelerator")
        for name in ("num_nodes", "gpus_per_node", "tensor_parallel", "pipeline_parallel", "context_parallel"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, f"cluster.{name}", f"must be a positive integer, got {value!r}")
        model_parallel = self.tensor_parallel * self.pipeline_parallel * self.context_parallel
        _require(self.world_size % model_parallel == 0, "cluster",
                 f"num_nodes x gpus_per_node = {self.world_size} is not divisible by "
                 f"tensor x pipeline x context parallel = {model_parallel}")

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_parallel * self.pipeline_parallel * self.context_parallel)


@dataclass(frozen=True)
class StageSpec:
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    # What the stage trains, one of METHODS (see there).
    method: str = "lora"

    def __post_init__(self):
        _choice(self.method, METHODS, "method")
        # A setting the method would ignore is a mistake to report, not to skip quietly.
        _require(self.train.embed_lr is None or self.method == "lora_embed", "train.embed_lr",
                 f"only method lora_embed trains embeddings (this stage's method is {self.method!r})")


@dataclass(frozen=True)
class PreferenceDataSpec:
    """Data of the dpo stage: preference pairs (prompt, chosen, rejected) as `jp-peft data prepare --format
    preference` writes them, and the held-out text every trained stage is measured on."""

    # the prepared training pairs (JSONL: prompt, chosen, rejected)
    train: str | None = None
    # raw preference JSONL the data stage prepares into `train` (jp-peft data prepare --format preference)
    train_source: tuple[str, ...] = ()
    # the prepared validation pairs: reward accuracy and margin at every validation
    validation: str | None = None
    # raw preference JSONL the data stage prepares into `validation`
    validation_source: tuple[str, ...] = ()
    # held-out Japanese indexed-dataset prefix (the perplexity before and after)
    val_ja: str | None = None
    # raw text the data stage prepares into val_ja
    val_ja_source: tuple[str, ...] = ()
    # held-out English indexed-dataset prefix (the forgetting)
    val_en: str | None = None
    # raw text the data stage prepares into val_en
    val_en_source: tuple[str, ...] = ()
    # tokens of prompt + answer (longer pairs are cut at the end); also the held-out block length
    seq_length: int = 1024

    def __post_init__(self):
        for name in ("train_source", "validation_source", "val_ja_source", "val_en_source"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _require(self.seq_length >= 8, "data.seq_length", f"must be >= 8, got {self.seq_length}")


@dataclass(frozen=True)
class DpoSpec:
    """The dpo stage: TRL's DPOTrainer from the model the stage starts from (SFT's merged model), a new LoRA
    adapter as the policy, the starting model (the adapter off) as the reference."""

    data: PreferenceDataSpec = field(default_factory=PreferenceDataSpec)
    # DPO wants a much lower learning rate than SFT (the presets set it: 5e-6 on the real model)
    train: TrainSpec = field(default_factory=TrainSpec)
    # what the stage trains: lora only (the reference is the starting model with the adapter off)
    method: str = "lora"
    # DPO's beta: how far the policy may move from the reference (higher: closer)
    beta: float = 0.1
    # one of DPO_LOSSES (TRL's loss_type); sigmoid is the DPO paper's loss
    loss_type: str = "sigmoid"

    def __post_init__(self):
        _choice(self.method, ("lora",), "method")
        _require(self.train.embed_lr is None, "train.embed_lr", "the dpo stage trains LoRA only (method lora)")
        _require(isinstance(self.beta, (int, float)) and self.beta > 0, "beta", f"must be positive, got {self.beta!r}")
        _choice(self.loss_type, DPO_LOSSES, "loss_type")


@dataclass(frozen=True)
class WandbSpec:
    """W&B run identity. Offline unless WANDB_API_KEY is set; the key never enters the spec."""

    # log to W&B (offline unless WANDB_API_KEY is set)
    enabled: bool = True
    # W&B project
    project: str = "jp-peft"
    # W&B entity (team); None: the key's default
    entity: str | None = None
    # extra W&B tags (the stage and backend are always added)
    tags: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "tags", tuple(self.tags))


@dataclass(frozen=True)
class EvalSpec:
    """Downstream evaluation by the eval stage (lm-evaluation-harness, offline; jp_peft.evaluation): the
    base model and each trained stage's exported model on the same tasks. Scores are in points
    (accuracy x 100); the Japanese gain and the English forgetting are against the base model."""

    # Japanese tasks or task sets (jp-peft eval --help lists them; a list, or one comma-separated string);
    # their mean is the JA average. Default: lm-eval's Japanese leaderboard, multiple choice
    # (JCommonsenseQA, JNLI, MARC-ja, XWinograd-ja).
    tasks_ja: tuple[str, ...] | str = ("ja_leaderboard",)
    # English tasks or sets; their mean is the EN average. Default "en": hellaswag, arc_easy, xwinograd_en.
    tasks_en: tuple[str, ...] | str = ("en",)
    # few-shot examples per task; None: each task's own default (lm-eval's YAML, 0 for the bundled tasks)
    num_fewshot: int | None = None
    # score only the first N items of each task; None: all of them
    limit: int | None = None
    # lm-eval batch size
    batch_size: int = 8
    # local task data: DATA_DIR/<task>/<split>.jsonl (Hub rows, unchanged); the bundled jpeft_* need none
    data_dir: str | None = None
    # directories of your own lm-eval task YAMLs (jp-peft eval --include-path)
    include_path: tuple[str, ...] = ()
    # greedy answers of every model to the bundled Japanese prompts -> eval/samples.jsonl
    generation: bool = True
    # length of each greedy sample
    max_new_tokens: int = 64
    # python/numpy/torch/few-shot seed of the evaluation
    seed: int = 1234

    def __post_init__(self):
        for name in ("tasks_ja", "tasks_en"):  # `eval.tasks_ja=jpeft_jcqa,jpeft_jnli` on the command line
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, tuple(t.strip() for t in value.split(",") if t.strip()))
        for name in ("tasks_ja", "tasks_en", "include_path"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            for item in getattr(self, name):
                _require(isinstance(item, str) and item.strip() != "", f"eval.{name}",
                         f"expected names, got {item!r}")
        _require(self.num_fewshot is None or (isinstance(self.num_fewshot, int) and self.num_fewshot >= 0),
                 "eval.num_fewshot", f"must be a non-negative integer or null, got {self.num_fewshot!r}")
        _require(self.limit is None or (isinstance(self.limit, int) and self.limit > 0), "eval.limit",
                 f"must be a positive integer or null (all items), got {self.limit!r}")
        for name in ("batch_size", "max_new_tokens"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, f"eval.{name}", f"must be a positive integer, got {value!r}")
        _require(self.data_dir is None or bool(self.data_dir), "eval.data_dir", "must be a directory or null")

    @property
    def downstream(self) -> bool:
        """Whether there are tasks to score (both lists empty: the eval stage only summarises perplexity)."""
        return bool(self.tasks_ja or self.tasks_en)


@dataclass(frozen=True)
class ExperimentSpec:
    # the run's name: its directory OUTPUT_DIR/NAME and its W&B run names
    name: str = "qwen_lora_ja"
    # Runs of one sweep share a group: their W&B group and the directory of shared stages.
    group: str | None = None
    # training engine: megatron (NeMo, CUDA; CPU only for the tiny model) or hf (transformers + peft)
    backend: str = "megatron"
    # where run directories go (relative: from the current directory)
    output_dir: str = "runs"
    # the stages to run, a subset of import, data, cpt, sft, dpo, export, eval (default: all but dpo)
    stages: tuple[str, ...] = DEFAULT_STAGES
    model: ModelSpec = field(default_factory=ModelSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    cpt: StageSpec = field(default_factory=StageSpec)
    sft: StageSpec = field(default_factory=StageSpec)
    dpo: DpoSpec = field(default_factory=DpoSpec)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    wandb: WandbSpec = field(default_factory=WandbSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(self.stages))
        _require(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "name",
                 f"must be a non-empty name without '/' (a directory under output_dir), got {self.name!r}")
        _require(self.group is None or (bool(self.group) and "/" not in self.group and self.group not in (".", "..")),
                 "group", f"must be a name without '/', got {self.group!r}")
        _require(len(self.stages) > 0, "stages", "nothing to run: name at least one of " + ", ".join(STAGES))
        _choice(self.backend, BACKENDS, "backend")
        for stage in self.stages:
            _choice(stage, STAGES, "stages")
            why = refusal(stage, self.backend)
            _require(why is None, "stages", str(why))
        for stage_name in TRAINED_STAGES:
            if stage_row(stage_name).optional and stage_name not in self.stages:
                continue  # an optional stage's section is checked when the run has it (a preset may size it for one GPU)
            train = getattr(self, stage_name).train
            per_step = train.micro_batch_size * self.cluster.data_parallel_size
            _require(train.global_batch_size % per_step == 0, f"{stage_name}.train.global_batch_size",
                     f"{train.global_batch_size} is not divisible by micro_batch_size x data_parallel_size "
                     f"= {train.micro_batch_size} x {self.cluster.data_parallel_size}")
        for stage_name in self.trained_stages if self.model.quantization else ():
            method = self.stage(stage_name).method
            _require(method == "lora", f"{stage_name}.method", f"model.quantization {self.model.quantization} trains LoRA "
                     f"on a frozen 4-bit base; {method} trains the base's own weights: use method lora, or drop "
                     "model.quantization")
        for stage_name in trained_with(BLEND):
            if stage_name in self.stages:
                _require(len(self.stage(stage_name).data.blend) > 0, f"{stage_name}.data.blend",
                         f"the {stage_name} stage needs at least one dataset")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def group_name(self) -> str:
        return self.group or self.name

    @property
    def group_dir(self) -> Path:
        """Where the stages a sweep shares (import, data) write."""
        return Path(self.output_dir) / self.group_name

    def stage(self, name: str) -> "StageSpec | DpoSpec":
        """The spec section of a trained stage (its row's `section` in jp_peft.spec.stages)."""
        return getattr(self, name)

    @property
    def exports(self) -> bool:
        """Whether the run has the export stage (each trained stage's checked export)."""
        return single_stage(EXPORT) in self.stages

    @property
    def trained_stages(self) -> tuple[str, ...]:
        """The trained stages this run has, in table order."""
        return tuple(s for s in TRAINED_STAGES if s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def local_model_dir(self) -> Path | None:
        """model.name as a local directory (an absolute path, ./ or ../ or ~), or None for a hub id."""
        name = self.model.name
        if self.model.tiny or not (name.startswith(("/", "./", "../", "~")) or Path(name).exists()):
            return None
        return Path(name).expanduser()

    def check_model_dir(self) -> None:
        """A local model directory must hold what the import stage loads: config.json, a tokenizer and weights."""
        path = self.local_model_dir()
        if path is None:
            return
        _require(path.is_dir(), "model.name", f"{path} is not a directory (a local Hugging Face model: config.json, "
                 "tokenizer, *.safetensors); `hf download Qwen/Qwen2.5-0.5B --local-dir DIR` makes one")
        missing = [what for what, patterns in (("config.json", ("config.json",)),
                                                ("a tokenizer", ("tokenizer.json", "vocab.json", "tokenizer.model")),
                                                ("weights", ("*.safetensors", "*.bin")))
                   if not any(any(path.glob(p)) for p in patterns)]
        _require(not missing, "model.name", f"{path} has no {', no '.join(missing)} (a local Hugging Face model "
                 "directory holds config.json, the tokenizer and *.safetensors)")

    def check_data_files(self) -> None:
        """Fail before launch if a stage's data is neither prepared nor preparable.

        Sources only count when the experiment has a `data` stage to prepare them.
        """
        will_prepare = "data" in self.stages

        def prefix_ready(prefix: str) -> bool:
            return Path(prefix + ".bin").exists() and Path(prefix + ".idx").exists()

        def check_sources(field_name: str, sources: tuple[str, ...]) -> None:
            _require(will_prepare, field_name.removesuffix(".source").removesuffix("_source"),
                     "not prepared yet; add the 'data' stage or run `jp-peft data prepare`")
            for src in sources:
                _require(Path(src).exists(), field_name, f"source file {src} does not exist")

        for stage_name in self.trained_stages:
            data = self.stage(stage_name).data
            if stage_name in trained_with(BLEND):
                for entry in data.blend:
                    field_name = f"{stage_name}.data.blend[{entry.name}]"
                    if not prefix_ready(entry.prefix):
                        _require(bool(entry.source), field_name,
                                 f"{entry.prefix}.bin/.idx not found and no source to prepare it from")
                        check_sources(field_name + ".source", entry.source)
            if stage_name in trained_with(PREFERENCE):
                for name in ("train", "validation"):
                    path, sources = getattr(data, name), getattr(data, f"{name}_source")
                    field_name = f"{stage_name}.data.{name}"
                    _require(path is not None, field_name, f"the {stage_name} stage needs a {name} file of preference "
                             "pairs (prompt, chosen, rejected JSONL)")
                    if not Path(path).is_file():
                        _require(bool(sources), field_name, f"{path} not found and no {name}_source; write it with "
                                 "`jp-peft data prepare --format preference`")
                        check_sources(f"{field_name}_source", sources)
            if stage_name in trained_with(CHAT):
                _require(data.sft_train is not None, f"{stage_name}.data.sft_train",
                         f"the {stage_name} stage needs a training file")
                if not Path(data.sft_train).exists():
                    _require(bool(data.sft_source), f"{stage_name}.data.sft_train",
                             f"{data.sft_train} not found and no sft_source")
                    check_sources(f"{stage_name}.data.sft_source", data.sft_source)
            for lang in ("ja", "en"):
                prefix = getattr(data, f"val_{lang}")
                sources = getattr(data, f"val_{lang}_source")
                field_name = f"{stage_name}.data.val_{lang}"
                _require(prefix is not None, field_name, "a held-out validation prefix is required")
                if not prefix_ready(prefix):
                    _require(bool(sources), field_name, f"{prefix}.bin/.idx not found and no source to prepare it from")
                    check_sources(field_name + "_source", sources)


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


# --- building specs from YAML presets and dotted overrides ---------------------------

_NESTED = {
    ExperimentSpec: {"model": ModelSpec, "lora": LoraSpec, "cpt": StageSpec, "sft": StageSpec, "dpo": DpoSpec,
                     "cluster": ClusterSpec, "wandb": WandbSpec, "eval": EvalSpec},
    StageSpec: {"data": DataSpec, "train": TrainSpec},
    DpoSpec: {"data": PreferenceDataSpec, "train": TrainSpec},
}


def build(cls, values: dict[str, Any], path: str = ""):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys by name."""
    if not isinstance(values, dict):
        raise SpecError(f"{path or cls.__name__}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = f"{path}.{key}" if path else key
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            raise SpecError(f"{where}: unknown field" + (f"; did you mean {hint[0]!r}?" if hint else
                                                          f"; known fields: {', '.join(sorted(known))}"))
        nested = _NESTED.get(cls, {}).get(key)
        if nested is not None:
            kwargs[key] = build(nested, value, where)
        else:
            kwargs[key] = _checked(value, _field_types(cls)[key], where)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # e.g. a list where a number belongs
        raise SpecError(f"{path or cls.__name__}: {exc}") from None
    except SpecError as exc:
        # Sections name their fields from their own section ("train.lr"); give the full path ("cpt.train.lr").
        message, section = str(exc), path.rsplit(".", 1)[-1]
        if path and "." in path and message.startswith(section + "."):
            raise SpecError(path + message[len(section):]) from None
        if path and message.split(":", 1)[0].split(".")[0] in known:  # a section's own field ("method" -> "cpt.method")
            raise SpecError(f"{path}.{message}") from None
        raise


def _field_types(cls) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def _checked(value: Any, annotation: Any, where: str) -> Any:
    """`value` if it is what the field's annotation says (ints are floats where floats go; YAML's
    `true` is never a number); otherwise a SpecError naming the field and what it expected."""
    import types
    import typing

    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    for option in options:
        if option is type(None) and value is None:
            return value
        origin = typing.get_origin(option) or option
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is str and isinstance(value, str):
            return value
        if origin in (tuple, list) and isinstance(value, (list, tuple)):
            (item_type, *_) = typing.get_args(option) or (Any,)
            if item_type is Any or item_type is Ellipsis:
                return value
            return tuple(_checked(v, item_type, f"{where}[{i}]") if not dataclasses.is_dataclass(item_type) else v
                         for i, v in enumerate(value))
        if origin is dict and isinstance(value, dict):
            return value
        if dataclasses.is_dataclass(origin) and isinstance(value, (dict, origin)):
            return value
        if option is Any:
            return value
    expected = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise SpecError(f"{where}: expected {expected}, got {value!r} ({type(value).__name__})")


def experiment_from_dict(values: dict[str, Any]) -> ExperimentSpec:
    return build(ExperimentSpec, values)

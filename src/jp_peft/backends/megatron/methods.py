"""What each training method (spec.METHODS) means on the NeMo Megatron backend: which PEFT object
the composed `llm.finetune` gets, which parameters train at which learning rate, and what is saved.

  lora        NeMo's LoRA (or CanonicalLoRA) on the spec's projections, as lora_mapping chooses.
  lora_embed  the same adapters, plus the input embeddings and the output layer left trainable
              (`*WithEmbeddings` below). NeMo's PEFT callback saves every parameter that requires grad
              (nemo/lightning/pytorch/callbacks/peft.py PEFT.set_params_to_save), so both travel in the
              adapter checkpoint and resume with it. Their learning rate: Megatron gives them their own
              optimizer group when optim.config.decoupled_lr is set (megatron/core/optimizer/__init__.py,
              `is_embedding_or_output_parameter`), and backends/megatron/embed_lr.py holds that group at
              embed_lr/lr times the scheduled rate.
  full        no PEFT at all (llm.finetune with peft=None): every parameter trains from the restored
              checkpoint, and the stage's checkpoints are whole models.

Tied embeddings. NeMo's Qwen2 importer unties them (nemo/collections/llm/gpt/model/qwen2.py,
HFQwen2Importer.config: share_embeddings_and_output_weights=False, lm_head copied into output_layer)
and its exporter writes tie_word_embeddings=False. So on this backend the embedding and the output
layer are two matrices, equal at the start of a tied base. Under lora both stay frozen and equal; under
lora_embed and full they train apart, and the exported model is untied (it keeps both; for
Qwen2.5-0.5B that is 136M more parameters in hf_merged than the tied base). The hf backend keeps the
tie instead (backends/hf/methods.py); the README says which to pick.
"""

from __future__ import annotations

from dataclasses import dataclass

import nemo_run as run
from nemo.collections.llm.peft.canonical_lora import CanonicalLoRA
from nemo.collections.llm.peft.lora import LoRA

from jp_peft.backends.megatron.embed_lr import EMBEDDING, is_embedding_or_output
from jp_peft.backends.megatron.lora_mapping import nemo_peft_kwargs
from jp_peft.spec import ExperimentSpec


class _TrainEmbeddings:
    """After NeMo's PEFT froze the whole model, leave the embeddings and the output layer trainable."""

    def freeze_model(self, model) -> None:
        super().freeze_model(model)
        unfrozen = []
        for name, param in model.named_parameters():
            if is_embedding_or_output(name):
                param.requires_grad_(True)
                unfrozen.append(name)
        # pipeline stages without the embedding have none; a model without one at all is not one we know
        if not any(name.endswith(EMBEDDING) for name in unfrozen) and _holds_embedding(model):
            raise RuntimeError(f"lora_embed: no parameter named *{EMBEDDING} in {type(model).__name__}")


def _holds_embedding(model) -> bool:
    from megatron.core import parallel_state

    try:
        return parallel_state.is_pipeline_first_stage()
    except (AssertionError, RuntimeError, ValueError):  # model parallel not initialised: one process holds all
        return True


@dataclass
class LoRAWithEmbeddings(_TrainEmbeddings, LoRA):
    """NeMo's fused LoRA plus trainable input embeddings and output layer (method lora_embed)."""


@dataclass
class CanonicalLoRAWithEmbeddings(_TrainEmbeddings, CanonicalLoRA):
    """NeMo's per-projection LoRA plus trainable input embeddings and output layer (method lora_embed)."""


WITH_EMBEDDINGS = {"LoRA": LoRAWithEmbeddings, "CanonicalLoRA": CanonicalLoRAWithEmbeddings}


def peft_config(spec: ExperimentSpec, stage: str) -> run.Config | None:
    """The PEFT object of a stage's method; None (no PEFT, every parameter trains) for full."""
    from nemo.collections import llm

    method = spec.stage(stage).method
    if method == "full":
        return None
    class_name, kwargs = nemo_peft_kwargs(spec.lora)
    cls = WITH_EMBEDDINGS[class_name] if method == "lora_embed" else getattr(llm.peft, class_name)
    return run.Config(cls, **kwargs)


def apply_optimizer(recipe: run.Partial, spec: ExperimentSpec, stage: str) -> None:
    """lora_embed with an embed_lr: the embeddings and output layer in Megatron's decoupled group."""
    train = spec.stage(stage).train
    if embed_lr_ratio(spec, stage) is not None:
        recipe.optim.config.decoupled_lr = train.embed_lr
        # the same share of the peak as every other group reaches (hf_methods decays them alike)
        recipe.optim.config.decoupled_min_lr = train.min_lr * train.embed_lr / train.lr


def embed_lr_ratio(spec: ExperimentSpec, stage: str) -> float | None:
    """embed_lr / lr of a lora_embed stage that sets embed_lr; None when the embeddings train at lr."""
    stage_spec = spec.stage(stage)
    if stage_spec.method != "lora_embed" or stage_spec.train.embed_lr is None:
        return None
    return stage_spec.train.embed_lr / stage_spec.train.lr

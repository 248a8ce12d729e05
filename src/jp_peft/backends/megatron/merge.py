"""Pieces of the Megatron backend's export stage (backends/megatron/stages.export runs them): merging a NeMo
LoRA checkpoint into its base, saving a full stage's weights, and a checkpoint's logits on CPU (parity)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def peft_trains_embeddings(peft) -> bool:
    """Whether a NeMo PEFT object also trains the embeddings and output layer (method lora_embed:
    backends/megatron/methods.py's *WithEmbeddings classes)."""
    return peft is not None and type(peft).__name__.endswith("WithEmbeddings")


def trains_embeddings(checkpoint: Path) -> bool:
    """Whether a NeMo checkpoint's PEFT also trained the embeddings and output layer (method lora_embed)."""
    from nemo.lightning import io
    from nemo.lightning.ckpt_utils import ckpt_to_context_subdir

    # the model's context, as nemo_load reads it (a whole checkpoint's has no model_transform to ask for alone)
    model = io.load_context(ckpt_to_context_subdir(checkpoint), subpath="model")
    return peft_trains_embeddings(getattr(model, "model_transform", None))


def load_trained_embeddings(checkpoint: Path, trainer) -> list[str]:
    """Load the embedding and output-layer weights a lora_embed checkpoint saved beside its adapters.

    NeMo restores a PEFT checkpoint's `.adapter.` tensors only (nemo/lightning/io/connector.py
    ModelConnector.nemo_load, nemo/collections/llm/peft/api.py _setup_trainer_and_restore_model_and_adapter),
    though its PEFT callback saved every trainable parameter; without this, an export of a lora_embed stage
    would carry the base's embeddings. Returns the keys loaded; raises if the checkpoint holds none."""
    from nemo.lightning.io.pl import ckpt_to_weights_subdir

    from jp_peft.backends.megatron.embed_lr import is_embedding_or_output

    weights_dir = ckpt_to_weights_subdir(checkpoint, is_saving=False)
    metadata = trainer.strategy.unwrapped_checkpoint_io.load_content_metadata(weights_dir)
    wanted = {k: v for k, v in trainer.strategy.megatron_parallel.sharded_state_dict(metadata=metadata).items()
              if is_embedding_or_output(k)}
    if not wanted:
        raise RuntimeError(f"{checkpoint}: a lora_embed checkpoint, but the model has no embedding/output layer keys")
    state = trainer.strategy.checkpoint_io.load_checkpoint(weights_dir, sharded_state_dict=wanted)
    trainer.strategy.load_model_state_dict(state, strict=False)
    return sorted(wanted)


def _cpu_trainer(fp32: bool):
    import nemo_run as run
    from nemo.lightning import MegatronStrategy, Trainer
    from nemo.lightning.pytorch.plugins.mixed_precision import MegatronMixedPrecision

    # as merge_lora builds it (a run.Config, not an instance: a merged checkpoint's context serialises it)
    return Trainer(devices=1, accelerator="cpu", strategy=MegatronStrategy(
        ddp="pytorch", setup_optimizers=False,
        plugins=run.Config(MegatronMixedPrecision, precision="32" if fp32 else "bf16-mixed")))


def load_peft_model(checkpoint: Path, fp32: bool = True):
    """(model, trainer) of a PEFT checkpoint with everything it computes with: the base it names (its
    adapter metadata), the adapters, and lora_embed's embeddings and output layer. The pieces of NeMo's
    merge_lora (nemo/collections/llm/peft/api.py:98-112), without the merge."""
    import torch
    from nemo.collections.llm.peft import api as peft_api

    trainer = _cpu_trainer(fp32)
    model, lora = peft_api._load_base_model_and_lora(Path(checkpoint))
    # what merge_lora sets to bf16 (api.py:126-127)
    model.config.bf16, model.config.params_dtype = not fp32, torch.float32 if fp32 else torch.bfloat16
    peft_api._setup_trainer_and_restore_model_and_adapter(Path(checkpoint), trainer, model, lora)
    if peft_trains_embeddings(lora):  # the checkpoint's own PEFT object, just loaded with its context
        load_trained_embeddings(checkpoint, trainer)
    return model, trainer


def is_peft_checkpoint(checkpoint: Path) -> bool:
    from nemo.lightning.ckpt_utils import ADAPTER_META_FILENAME
    from nemo.lightning.io.pl import ckpt_to_weights_subdir

    return (ckpt_to_weights_subdir(checkpoint, is_saving=False) / ADAPTER_META_FILENAME).exists()


def load_trained_model(checkpoint: Path):
    """(model, trainer) of any NeMo checkpoint on CPU, computing what it was trained to: a PEFT stage's
    checkpoint in fp32 with its base (load_peft_model), or a whole model (a full stage's checkpoint, a
    merged or imported one) as NeMo's exporters load it."""
    from nemo.collections.llm.gpt.model.qwen2 import HFQwen2Exporter

    if is_peft_checkpoint(checkpoint):
        return load_peft_model(checkpoint, fp32=True)
    return HFQwen2Exporter(str(checkpoint)).nemo_load(str(checkpoint), cpu=True)


def save_whole_model(checkpoint: Path, output: Path) -> None:
    """A full-parameter stage's checkpoint (model and optimizer state) -> a weights-only NeMo checkpoint at
    `output`, written as merge_lora writes its result (nemo/collections/llm/peft/api.py _save_merged_weight)."""
    from nemo.collections.llm.peft import api as peft_api

    if is_peft_checkpoint(checkpoint):
        raise ValueError(f"{checkpoint}: a PEFT checkpoint; merge it (merge_lora) instead")
    if output.exists():
        shutil.rmtree(output)
    model, trainer = load_trained_model(checkpoint)
    peft_api._save_merged_weight(str(output), trainer.strategy.megatron_parallel.sharded_state_dict(), model, trainer)


def merge_lora(lora_checkpoint: Path, output: Path, fp32: bool) -> None:
    """The LoRA checkpoint merged into its base, as a NeMo checkpoint at `output`.

    bf16 runs of plain LoRA use NeMo's own llm.peft.merge_lora. It always merges in bf16 (peft/api.py:104
    plugin, :126-127 model dtype), which rounds an fp32 run's merged weights (PEFT(base + adapter) then
    differs from the merged model by ~4e-3 on the tiny model); fp32 runs merge with the same NeMo pieces
    merge_lora uses, in fp32. lora_embed checkpoints always take the second way, in the run's precision,
    because merge_lora would drop their trained embeddings (see load_trained_embeddings).
    """
    from nemo.collections import llm
    from nemo.collections.llm.peft import api as peft_api
    from nemo.collections.llm.peft.lora import LoRAMerge

    if output.exists():
        shutil.rmtree(output)
    if not fp32 and not trains_embeddings(lora_checkpoint):
        llm.peft.merge_lora(lora_checkpoint_path=str(lora_checkpoint), output_path=str(output))
        return
    model, trainer = load_peft_model(lora_checkpoint, fp32)
    merged = LoRAMerge()(trainer.strategy.megatron_parallel)
    weights = {k: v for k, v in merged.sharded_state_dict().items() if ".adapter." not in k}
    peft_api._save_merged_weight(str(output), weights, model, trainer)


@torch.no_grad()
def nemo_logits(checkpoint: str | Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a NeMo 2 checkpoint (a stage's own checkpoint, as trained, or a merged/imported model)
    through its Megatron forward, loaded on CPU as NeMo's exporters load it."""
    model, _ = load_trained_model(Path(checkpoint))
    model.eval()
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return model.forward(input_ids=ids, position_ids=positions, attention_mask=None).float()

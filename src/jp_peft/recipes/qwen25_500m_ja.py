"""Qwen2.5-0.5B Japanese LoRA continual learning, as NeMo 2.0 recipes.

Built on NVIDIA's `llm.qwen25_500m.finetune_recipe`: each factory composes it and changes only
what the jp-peft spec (jp_peft/recipes/configs/qwen25_500m_ja.yaml) says differently. On the embedded
tiny model (--smoke) only size fields change (the model's shape); on CPU only device fields
(jp_peft.backends.megatron.compose.use_cpu).

    from jp_peft.recipes import qwen25_500m_ja
    recipe = qwen25_500m_ja.cpt_lora()                      # run.Partial(llm.finetune, ...)
    recipe.trainer.max_steps = 2000                         # or CLI: trainer.max_steps=2000
"""


from typing import Optional

import lightning.pytorch as pl
import nemo_run as run
from nemo.collections import llm

from jp_peft.backends.megatron import compose as megatron
from jp_peft.backends.megatron import methods as megatron_methods
from jp_peft.resources import presets_dir
from jp_peft.spec import ExperimentSpec, experiment_from_dict, load_preset, resolve_spec

NAME = "qwen25_500m_ja"
PRESET = presets_dir() / "qwen25_500m_ja.yaml"


def _spec(spec: Optional[dict]) -> ExperimentSpec:
    """The given resolved spec, or the default preset resolved against the current directory."""
    return experiment_from_dict(spec) if spec is not None else resolve_spec(load_preset(PRESET), [])


@run.cli.factory(name=NAME)
def model() -> run.Config[pl.LightningModule]:
    """Qwen2.5-0.5B exactly as NVIDIA configures it (Qwen25Config500M)."""
    return llm.qwen25_500m.model()


@run.cli.factory(target=llm.import_ckpt, name=NAME + "_import")
def import_base(spec: Optional[dict] = None) -> run.Partial:
    """Hugging Face base (hub id or local directory) -> NeMo checkpoint under NEMO_HOME."""
    exp = _spec(spec)
    return run.Partial(llm.import_ckpt, model=run.Config(llm.Qwen2Model, config=megatron.model_config(exp)),
                       source=f"hf://{megatron.hf_base_path(exp)}",
                       output_path=str(megatron.imported_base_path(exp)), overwrite=True)


def _finetune(exp: ExperimentSpec, stage: str) -> run.Partial:
    recipe = llm.qwen25_500m.finetune_recipe(dir=str(exp.run_dir), name=stage, num_nodes=exp.cluster.num_nodes,
                                             num_gpus_per_node=exp.cluster.gpus_per_node, peft_scheme="lora")
    # Model: NVIDIA's Qwen2.5-0.5B config; the embedded tiny model's shape where the spec asks for it
    recipe.model.config = megatron.model_config(exp)
    # Method: the spec's LoRA as NeMo's fused LoRA (whole q/k/v and gate/up groups; see lora_mapping),
    # plus trainable embeddings and output layer (lora_embed), or no PEFT at all (full)
    recipe.peft = megatron_methods.peft_config(exp, stage)
    # Trainer, parallelism, optimiser (lora_embed: the embeddings' own learning rate)
    megatron.apply_training(recipe, exp, exp.stage(stage))
    megatron_methods.apply_optimizer(recipe, exp, stage)
    # Logging and checkpoints: W&B + TensorBoard, ModelCheckpoint every N steps; throughput, MFU and
    # Japanese/English validation losses from jp-peft's callbacks
    recipe.log = megatron.logger(exp, stage)
    recipe.trainer.callbacks = [*(recipe.trainer.callbacks or []), *megatron.callbacks(exp, stage)]
    # Resume: a requeued job continues from its own last checkpoint, else from the stage's start
    recipe.resume = megatron.resume(str(megatron.stage_start_nemo(exp, stage)))
    return recipe


def _devices(recipe: run.Partial, exp: ExperimentSpec, stage: str) -> run.Partial:
    if exp.cluster.accelerator == "cpu":
        megatron.use_cpu(recipe, exp, stage)
    return recipe


@run.cli.factory(target=llm.finetune, name=NAME + "_cpt")
def cpt_lora(spec: Optional[dict] = None) -> run.Partial:
    """Continual pre-training (cpt.method: lora, lora_embed or full) on the weighted Japanese/English blend.

    llm.pretrain takes no PEFT and starts from random weights, so every method goes through
    llm.finetune (which restores the imported checkpoint) with Megatron's PreTrainingDataModule as data."""
    exp = _spec(spec)
    recipe = _finetune(exp, "cpt")
    # Data: raw-text blend -> PreTrainingDataModule(paths=[w1, prefix1, w2, prefix2])
    recipe.data = megatron.cpt_data(exp)
    return _devices(recipe, exp, "cpt")


@run.cli.factory(target=llm.finetune, name=NAME + "_sft")
def sft_lora(spec: Optional[dict] = None) -> run.Partial:
    """Instruction tuning (sft.method) on Japanese chat data, packed, from the merged CPT model when there is one."""
    exp = _spec(spec)
    recipe = _finetune(exp, "sft")
    # Data: ChatML input/output JSONL -> FineTuningDataModule with packed sequences (unpacked on CPU)
    recipe.data = megatron.sft_data(exp)
    return _devices(recipe, exp, "sft")


# The factory of each stage whose Megatron task carries a composed recipe (jp_peft.backends: `composes`)
FACTORIES = {"import": import_base, "cpt": cpt_lora, "sft": sft_lora}

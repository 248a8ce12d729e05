"""The NeMo Megatron backend: NVIDIA's nemo.collections.llm objects (compose.py, composed further by the
recipes in jp_peft.recipes), run by stages.py; cpu.py gets NeMo's Megatron path past its CUDA assumptions
for the embedded tiny model and for a local Qwen2.5-0.5B-shaped directory (the real-shape CPU tier)."""

from __future__ import annotations

from jp_peft.backends import ONE_PROCESS, Backend, LaunchNeeds
from jp_peft.spec.fields import SpecError
from jp_peft.spec.stages import IMPORT, TRAIN, stage as stage_row

NEEDS_CUDA = ("error: the NeMo Megatron backend needs a CUDA GPU and none was found on this machine.\n"
              "  try the whole pipeline on CPU:        python experiments/qwen_lora_ja.py --smoke\n"
              "  NeMo's Megatron path on the tiny model: python experiments/qwen_lora_ja.py --smoke --backend megatron\n"
              "  train with Hugging Face on this box:  python experiments/qwen_lora_ja.py --backend hf "
              "--hf-model /path/to/Qwen2.5-0.5B\n"
              "  see what would run on a GPU:          python experiments/qwen_lora_ja.py --dryrun\n"
              "  or submit to a GPU cluster:           python experiments/qwen_lora_ja.py --executor slurm "
              "--slurm-profile <profile>")


def cpu_allowed(spec) -> bool:
    """Whether NeMo's Megatron path may run on CPU for this spec's model: the embedded tiny model (--smoke, CI),
    or a local model directory, whose architecture check_architecture holds to the recipe's (the real-shape
    CPU tier: Qwen2.5-0.5B's shapes with random weights, jp_peft.models.real_shape). A hub id stays refused:
    downloading and training the real model on CPU is a mistake, not a tier."""
    return spec.model.tiny or spec.local_model_dir() is not None


class MegatronBackend(Backend):
    name = "megatron"
    shared_env = ("NEMO_HOME",)  # import_ckpt writes NEMO_HOME/models/<hub id>; cpt and sft restore from there

    def validate(self, spec) -> None:
        if spec.model.quantization is not None:
            raise SpecError(f"model.quantization: {spec.model.quantization} needs a 4-bit base model, which NeMo 2.7.3's "
                            "nemo.collections.llm does not have (no bitsandbytes/NF4 Qwen2); use --backend hf for "
                            "QLoRA, or drop model.quantization")
        if spec.cluster.accelerator == "cpu":
            if not cpu_allowed(spec):
                raise SpecError("cluster.accelerator: the Megatron backend runs on CPU only for the embedded tiny "
                                "model (--smoke) or a local model directory of the recipe's architecture (the "
                                "real-shape CPU tier: model.name=$(python -m jp_peft.models.real_shape) "
                                "model.tiny=false); a hub id needs a GPU, or --backend hf")
        # Each of cluster.gpus_per_node is a gloo rank on CPU (data and tensor parallel run there); the
        # per-language validation runs the model's whole forward in one process, so no pipeline split yet
        if spec.cluster.pipeline_parallel > 1:
            raise SpecError("cluster.pipeline_parallel: the Megatron backend's per-language validation runs the "
                            "whole model in each process (LanguageValidation); use tensor_parallel or data "
                            "parallel ranks (cluster.gpus_per_node) instead")
        # LoRA targets NeMo cannot train are refused before anything is queued
        from jp_peft.backends.megatron.lora_mapping import to_nemo_targets

        to_nemo_targets(spec.lora.target_modules)
        self.check_architecture(spec)

    @staticmethod
    def check_architecture(spec) -> None:
        """A local model directory must have the architecture of the NeMo config the recipe builds
        (model.nemo_config), or the import would fail late or, worse, load into the wrong shape."""
        import json

        path = spec.local_model_dir()
        if path is None or not (path / "config.json").is_file():
            return
        from jp_peft.backends.megatron.compose import HF_TO_NEMO_SHAPE, nemo_config_shape

        hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
        nemo = nemo_config_shape(spec.model.nemo_config)
        differ = [f"{hf_key} {hf.get(hf_key)} (model.nemo_config {spec.model.nemo_config}: {nemo[nemo_key]})"
                  for hf_key, nemo_key in HF_TO_NEMO_SHAPE.items()
                  if nemo_key in nemo and hf.get(hf_key) != nemo[nemo_key]]
        if differ:
            raise SpecError(f"model.name: {path} is not the architecture the recipe builds: {'; '.join(differ)}")

    def local_overrides(self, smoke: bool, has_cuda: bool) -> list[str]:
        """--smoke without a GPU: NeMo's Megatron path on CPU (the embedded tiny model only)."""
        return ["cluster.accelerator=cpu"] if smoke and not has_cuda else []

    def cannot_run_here(self, smoke: bool, has_cuda: bool) -> str | None:
        return None if has_cuda or smoke else NEEDS_CUDA

    def composes(self, stage: str) -> bool:
        # import (llm.import_ckpt) and the trained stages (llm.finetune) are NeMo recipes
        return stage_row(stage).kind in (IMPORT, TRAIN) and self.name in stage_row(stage).backends

    def launch_needs(self, spec, stage: str) -> LaunchNeeds:
        if stage_row(stage).kind != TRAIN:
            return ONE_PROCESS
        return LaunchNeeds(nodes=spec.cluster.num_nodes, processes_per_node=spec.cluster.gpus_per_node,
                           distributed=True, on_cpu=spec.cluster.accelerator == "cpu")

    def import_model(self, spec, hf_dir, recipe):
        from jp_peft.backends.megatron.stages import import_model

        return import_model(spec, hf_dir, recipe)

    def train(self, spec, stage, recipe):
        from jp_peft.backends.megatron.stages import train

        return train(spec, stage, recipe)

    def export(self, spec, stage):
        from jp_peft.backends.megatron.stages import export

        return export(spec, stage)

    def checkpoints(self, spec, stage):
        from jp_peft.records import layout

        return layout.nemo_checkpoints(spec, stage)

"""The Hugging Face backend: transformers + peft + Lightning, on CPU, one GPU or several as DDP ranks (stages.py runs it)."""

from __future__ import annotations

from jp_peft.backends import ONE_PROCESS, Backend, LaunchNeeds
from jp_peft.spec.fields import SpecError
from jp_peft.spec.stages import PREFERENCE, TRAIN, stage as stage_row


class HFBackend(Backend):
    name = "hf"

    def validate(self, spec) -> None:
        self.check_data_parallel(spec)
        self.check_preference_files(spec)
        if spec.model.quantization is not None:
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                raise SpecError(f"model.quantization: {spec.model.quantization} needs bitsandbytes, which is not installed "
                                "(pip install 'bitsandbytes==0.50.2', or rerun scripts/setup.sh); or drop model.quantization")

    def launch_needs(self, spec, stage: str) -> LaunchNeeds:
        # a trained stage on several devices: DDP ranks torchrun starts (gloo processes on CPU)
        if stage_row(stage).kind != TRAIN or spec.cluster.world_size == 1:
            return ONE_PROCESS
        return LaunchNeeds(nodes=spec.cluster.num_nodes, processes_per_node=spec.cluster.gpus_per_node,
                           distributed=True, on_cpu=spec.cluster.accelerator == "cpu")

    @staticmethod
    def check_data_parallel(spec) -> None:
        """Several devices on the hf backend are data parallel only (DDP), for the Lightning-trained stages:
        each rank trains a whole share of micro batches of every global batch (the spec already makes the
        global batch a multiple of micro batch x data-parallel ranks)."""
        cluster, world = spec.cluster, spec.cluster.world_size
        if world == 1:
            return
        split = [f"{name}={getattr(cluster, name)}" for name in ("tensor_parallel", "pipeline_parallel", "context_parallel")
                 if getattr(cluster, name) != 1]
        if split:
            raise SpecError(f"cluster: the hf backend is data parallel only ({', '.join(split)}); use --backend megatron "
                            "to split the model")
        if spec.model.quantization is not None:
            raise SpecError(f"model.quantization: QLoRA on the hf backend trains on one device (num_nodes x "
                            f"gpus_per_node = {world})")
        for stage in spec.trained_stages:
            if stage_row(stage).data_kind == PREFERENCE:
                raise SpecError(f"cluster: {stage} (TRL's DPO) trains on one device on the hf backend (num_nodes x "
                                f"gpus_per_node = {world})")

    def train(self, spec, stage, recipe=None):
        from jp_peft.backends.hf.stages import train

        return train(spec, stage)

    def export(self, spec, stage):
        from jp_peft.backends.hf.stages import export

        return export(spec, stage)

    def checkpoints(self, spec, stage):
        from jp_peft.records import layout

        return layout.trainer_checkpoints(spec, stage)

    @staticmethod
    def check_preference_files(spec) -> None:
        """Prepared preference pairs that are already there are read at plan time: a bad line is named
        (file:line) before anything is queued, not after the stages before dpo have trained."""
        from pathlib import Path

        from jp_peft.data.chat import PairsError, load_pairs

        for stage in spec.trained_stages:
            if stage_row(stage).data_kind != PREFERENCE:
                continue
            for name in ("train", "validation"):
                path = getattr(spec.stage(stage).data, name)
                if path and Path(path).is_file():
                    try:
                        load_pairs(path)
                    except PairsError as exc:
                        raise SpecError(f"{stage}.data.{name}: {exc}") from None

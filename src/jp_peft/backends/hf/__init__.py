"""The Hugging Face backend: transformers + peft + Lightning, on CPU or one GPU (stages.py runs it)."""

from __future__ import annotations

from jp_peft.backends import Backend
from jp_peft.spec.fields import SpecError


class HFBackend(Backend):
    name = "hf"

    def validate(self, spec) -> None:
        if spec.cluster.world_size != 1:
            raise SpecError(f"cluster: the hf backend trains on one device (num_nodes x gpus_per_node = "
                            f"{spec.cluster.world_size}); use --backend megatron for several")
        self.check_preference_files(spec)
        if spec.model.quantization is not None:
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                raise SpecError(f"model.quantization: {spec.model.quantization} needs bitsandbytes, which is not installed "
                                "(pip install 'bitsandbytes==0.50.2', or rerun scripts/setup.sh); or drop model.quantization")

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
        from jp_peft.spec.stages import PREFERENCE, stage as stage_row

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

"""The experiment spec: what a run is (fields), which stages it has (the stage table), and how a preset
plus overrides becomes one (resolve). `from jp_peft.spec import X` reaches all three."""

from jp_peft.spec.fields import (ACCELERATORS, BACKENDS, HF_LORA_TARGETS, METHODS, PRECISIONS,  # noqa: F401
                                 BlendEntry, ClusterSpec, DataSpec, EvalSpec, ExperimentSpec, LoraSpec, ModelSpec,
                                 SpecError, StageSpec, TrainSpec, WandbSpec, build, experiment_from_dict)
from jp_peft.spec.resolve import (apply_overrides, inline_blend_files, load_blend, load_preset,  # noqa: F401
                                  job_paths, parse_sweep, preset_names, preset_path, read_spec_file, resolve_spec,
                                  variant_suffix, with_stages)
from jp_peft.spec.stages import SHARED_STAGES, STAGES, TRAINED_STAGES  # noqa: F401

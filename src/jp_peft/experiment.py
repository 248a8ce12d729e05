"""Spec -> NeMo-Run `Experiment`: one task per stage, chained by dependencies, one chain per sweep variant.

import and data are shared by all variants of a sweep (they write under the group directory);
cpt -> export(cpt) -> sft -> export(sft) -> eval form one chain per variant (each trained stage
is exported before the next starts: on Megatron, SFT restores from the merged CPT checkpoint the
CPT export writes). On Slurm the dependencies become `afterok`; the local executor runs the
chain level by level.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jp_peft.spec import (SHARED_STAGES, STAGES, TRAINED_STAGES, ExperimentSpec, SpecError, apply_overrides,
                          experiment_from_dict, inline_blend_files)


def parse_sweep(items: list[str]) -> list[list[str]]:
    """`lora.rank=8,16` `train.lr=1e-4,2e-4` -> the cartesian product as override lists."""
    axes = []
    for item in items:
        if "=" not in item:
            raise SpecError(f"--sweep {item!r}: expected key=v1,v2,...")
        key, values = item.split("=", 1)
        choices = [v for v in values.split(",") if v != ""]
        if not choices:
            raise SpecError(f"--sweep {item!r}: no values")
        repeated = sorted({v for v in choices if choices.count(v) > 1})
        if repeated:
            raise SpecError(f"--sweep {item!r}: {', '.join(repeated)} given twice (two runs of one variant would "
                            "write the same directory)")
        axes.append([f"{key}={v}" for v in choices])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def variant_suffix(overrides: list[str]) -> str:
    """`lora.rank=8` -> `rank8`: short, readable names for W&B and directories."""
    parts = []
    for item in overrides:
        key, value = item.split("=", 1)
        parts.append(f"{key.split('.')[-1]}{value}".replace("/", "_"))
    return "-".join(parts)


def _expand_paths(node: Any, mapping: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _expand_paths(v, mapping) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_paths(v, mapping) for v in node]
    if isinstance(node, str) and "{" in node:
        for key, value in mapping.items():
            node = node.replace("{" + key + "}", value)
    return node


def _absolute_data_paths(values: dict, cwd: Path) -> None:
    """Data paths become absolute: tasks run in other directories (NeMo-Run job dirs, Slurm nodes)."""
    def fix(path: str) -> str:
        return str(path if Path(path).is_absolute() else (cwd / path).resolve())

    for stage in ("cpt", "sft"):
        data = values.get(stage, {}).get("data", {})
        for key in ("sft_train", "sft_val", "val_ja", "val_en"):
            if isinstance(data.get(key), str):
                data[key] = fix(data[key])
        for key in ("sft_source", "val_ja_source", "val_en_source"):
            if data.get(key):
                data[key] = [fix(p) for p in data[key]]
        for entry in data.get("blend", []) or []:
            if isinstance(entry, dict):
                entry["prefix"] = fix(entry["prefix"])
                entry["source"] = [fix(p) for p in entry.get("source", [])]
    evaluation = values.get("eval", {})
    if isinstance(evaluation, dict):
        if isinstance(evaluation.get("data_dir"), str) and evaluation["data_dir"]:
            evaluation["data_dir"] = fix(evaluation["data_dir"])
        if isinstance(evaluation.get("include_path"), list):
            evaluation["include_path"] = [fix(p) if isinstance(p, str) and p else p for p in evaluation["include_path"]]
    model = values.get("model", {})
    if isinstance(model.get("name"), str) and Path(model["name"]).exists():
        model["name"] = fix(model["name"])


def resolve_spec(values: dict, overrides: list[str], cwd: Path | None = None) -> ExperimentSpec:
    import copy

    cwd = cwd or Path.cwd()
    values = apply_overrides(copy.deepcopy(values), overrides)
    inline_blend_files(values)  # `cpt.data.blend=my_blend.yaml` on the command line, as in a preset
    if not isinstance(values.get("output_dir", "runs"), str) or not values.get("output_dir", "runs"):
        raise SpecError(f"output_dir: expected a directory path, got {values.get('output_dir')!r}")
    output_dir = str((cwd / values.get("output_dir", "runs")).resolve())
    values["output_dir"] = output_dir
    name = values.get("name", "qwen_lora_ja")
    group = values.get("group") or name
    for field_name, value in (("name", name), ("group", group), ("output_dir", values["output_dir"])):
        if not isinstance(value, str) or value in ("", ".", "..") or (field_name != "output_dir" and "/" in value):
            raise SpecError(f"{field_name}: expected a name (a directory under output_dir), got {value!r}")
    values = _expand_paths(values, {"group_dir": str(Path(output_dir) / group), "run_dir": str(Path(output_dir) / name),
                                    "repo": str(Path(__file__).resolve().parents[2])})
    _absolute_data_paths(values, cwd)
    return experiment_from_dict(values)


@dataclass
class PlannedTask:
    name: str
    stage: str
    spec: ExperimentSpec
    depends_on: list[str]
    target: str | None = None  # the trained stage an export task exports


def run_sequence(spec: ExperimentSpec, shared: bool) -> list[tuple[str, str | None]]:
    """(stage, export target) in launch order: the stages a group shares (import, data; shared=True)
    or those of one run (training, exports, eval; shared=False). Each depends on the one before."""
    if shared:
        return [(stage, None) for stage in SHARED_STAGES if stage in spec.stages]
    sequence: list[tuple[str, str | None]] = []
    for stage in TRAINED_STAGES:
        if stage in spec.stages:
            sequence.append((stage, None))
            if "export" in spec.stages:
                sequence.append(("export", stage))
    if "eval" in spec.stages:
        sequence.append(("eval", None))
    return sequence


def task_name(spec: ExperimentSpec, stage: str, target: str | None = None) -> str:
    return f"{spec.name}-export-{target}" if stage == "export" else f"{spec.name}-{stage}"


def plan(values: dict, overrides: list[str], sweep: list[str], stages: list[str] | None = None) -> list[PlannedTask]:
    """The tasks of the experiment, in launch order, with their dependencies; validates every spec."""
    variants = parse_sweep(sweep)
    if stages:
        for stage in stages:
            if stage not in STAGES:
                raise SpecError(f"--stages: {stage!r} is not one of {', '.join(STAGES)}")
        overrides = [*overrides, f"stages=[{','.join(stages)}]"]
    base = resolve_spec(values, overrides)
    tasks: list[PlannedTask] = []
    previous_shared: list[str] = []
    for stage, _ in run_sequence(base, shared=True):
        tasks.append(PlannedTask(task_name(base, stage), stage, base, list(previous_shared)))
        previous_shared = [tasks[-1].name]
    for variant in variants:
        if variant:
            suffix = variant_suffix(variant)
            spec = resolve_spec(values, [*overrides, *variant, f"name={base.name}-{suffix}", f"group={base.group_name}",
                                         f"wandb.tags=[{','.join([*base.wandb.tags, suffix])}]"])
        else:
            spec = base
        spec.check_data_files()
        if spec.backend == "megatron":  # refuse LoRA targets NeMo cannot train before anything is queued
            from jp_peft.lora_mapping import to_nemo_targets

            to_nemo_targets(spec.lora.target_modules)
        deps = list(previous_shared)
        for stage, target in run_sequence(spec, shared=False):
            tasks.append(PlannedTask(task_name(spec, stage, target), stage, spec, deps, target=target))
            deps = [tasks[-1].name]
    if not tasks:
        raise SpecError("stages: nothing to run")
    return tasks


def task_config(task: PlannedTask, recipes):
    """The NeMo-Run callable of a task: always jp_peft.stages.run_stage; on the Megatron backend the
    stages that call NeMo (import, cpt, sft) carry the NeMo recipe that `recipes` (the recipe module,
    e.g. recipes.qwen25_500m_ja) composes for them, nested and visible in --dryrun."""
    import nemo_run as run

    from jp_peft.stages import run_stage

    recipe = None
    if task.spec.backend == "megatron" and task.stage in ("import", *TRAINED_STAGES):
        factory = {"import": recipes.import_base, "cpt": recipes.cpt_lora, "sft": recipes.sft_lora}[task.stage]
        recipe = factory(spec=task.spec.to_dict())
    return run.Partial(run_stage, spec=task.spec.to_dict(), stage=task.stage, target=task.target, recipe=recipe)


def new_experiment(title: str, base_dir: Path, quiet: bool = False):
    """quiet: no NeMo-Run console tables (the local launcher prints its own progress, one task at a time)."""
    import nemo_run as run

    if quiet:
        return run.Experiment(title, base_dir=str(base_dir), log_level="WARN", clean_mode=True,
                              enable_goodbye_message=False, skip_status_at_exit=True)
    return run.Experiment(title, base_dir=str(base_dir), log_level="WARN")


def add_tasks(exp, tasks: list[PlannedTask], executor_for, recipes) -> None:
    """Add the tasks inside `with exp:`; `executor_for(task)` returns the executor of one task."""
    ids: dict[str, str] = {}
    for task in tasks:
        deps = [ids[name] for name in task.depends_on]
        ids[task.name] = exp.add(task_config(task, recipes), executor=executor_for(task), name=task.name,
                                 dependencies=deps or None, tail_logs=False)

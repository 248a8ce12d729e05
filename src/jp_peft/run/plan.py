"""Spec -> NeMo-Run `Experiment`: one task per stage, chained by dependencies, one chain per sweep variant.

import and data are shared by all variants of a sweep (they write under the group directory);
cpt -> export(cpt) -> sft -> export(sft) -> eval form one chain per variant (each trained stage
is exported before the next starts: on Megatron, SFT restores from the merged CPT checkpoint the
CPT export writes). On Slurm the dependencies become `afterok`; the local executor runs the
chain level by level.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from jp_peft.backends import backend_of
from jp_peft.export.deployability import unservable_adapter_warnings
from jp_peft.records import layout as rundir
from jp_peft.spec import ExperimentSpec, SpecError, parse_sweep, resolve_spec, variant_suffix, with_stages
from jp_peft.spec.stages import EVAL, EXPORT, SHARED_STAGES, TRAIN, single_stage, stage as stage_row


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
    export, evaluation = single_stage(EXPORT), single_stage(EVAL)
    sequence: list[tuple[str, str | None]] = []
    for stage in spec.trained_stages:
        sequence.append((stage, None))
        if export in spec.stages:
            sequence.append((export, stage))
    if evaluation in spec.stages:
        sequence.append((evaluation, None))
    return sequence


def task_name(spec: ExperimentSpec, stage: str, target: str | None = None) -> str:
    return f"{spec.name}-{stage}-{target}" if target is not None else f"{spec.name}-{stage}"


def plan(values: dict, overrides: list[str], sweep: list[str], stages: list[str] | None = None,
         dryrun: bool = False) -> list[PlannedTask]:
    """The tasks of the experiment, in launch order, with their dependencies; validates every spec. A dry run
    warns about data files that are missing here (the data stage or `jp-peft data prepare` makes them) instead."""
    variants = parse_sweep(sweep)
    overrides = with_stages(overrides, stages)
    base = resolve_spec(values, overrides)
    tasks: list[PlannedTask] = []
    previous_shared: list[str] = []
    for stage, _ in run_sequence(base, shared=True):
        tasks.append(PlannedTask(task_name(base, stage), stage, base, list(previous_shared)))
        previous_shared = [tasks[-1].name]
    warned: set[str] = set()
    for variant in variants:
        if variant:
            suffix = variant_suffix(variant)
            spec = resolve_spec(values, [*overrides, *variant, f"name={base.name}-{suffix}", f"group={base.group_name}",
                                         f"wandb.tags=[{','.join([*base.wandb.tags, suffix])}]"])
        else:
            spec = base
        spec.check_model_dir()
        try:
            spec.check_data_files()
        except SpecError as exc:  # a dry run on a fresh directory shows what would run once the data exists
            if not dryrun:
                raise
            print(f"warning: a launch would be refused: {exc}", file=sys.stderr)
        backend_of(spec).validate(spec)  # what this backend cannot run is refused before anything is queued
        for line in unservable_adapter_warnings(spec):  # a choice to make knowingly, not a refusal
            if line not in warned:
                print(f"warning: {line}", file=sys.stderr)
                warned.add(line)
        deps = list(previous_shared)
        for stage, target in run_sequence(spec, shared=False):
            tasks.append(PlannedTask(task_name(spec, stage, target), stage, spec, deps, target=target))
            deps = [tasks[-1].name]
    if not tasks:
        raise SpecError("stages: nothing to run")
    return tasks


def task_config(task: PlannedTask):
    """The NeMo-Run callable of a task: always jp_peft.run.entry.run_stage; a stage whose backend composes a
    recipe for it (Megatron: import, cpt, sft) carries the NeMo recipe jp_peft.recipes composes, nested and
    visible in --dryrun."""
    import nemo_run as run

    from jp_peft.run.entry import run_stage

    recipe = None
    if backend_of(task.spec).composes(task.stage):
        from jp_peft.recipes import compose

        recipe = compose(task.spec, task.stage)
    return run.Partial(run_stage, spec=task.spec.to_dict(), stage=task.stage, target=task.target, recipe=recipe)


def new_experiment(title: str, base_dir: Path, quiet: bool = False):
    """quiet: no NeMo-Run console tables (the local launcher prints its own progress, one task at a time)."""
    import nemo_run as run

    if quiet:
        return run.Experiment(title, base_dir=str(base_dir), log_level="WARN", clean_mode=True,
                              enable_goodbye_message=False, skip_status_at_exit=True)
    return run.Experiment(title, base_dir=str(base_dir), log_level="WARN")


def add_tasks(exp, tasks: list[PlannedTask], executor_for) -> None:
    """Add the tasks inside `with exp:`; `executor_for(task)` returns the executor of one task."""
    ids: dict[str, str] = {}
    for task in tasks:
        deps = [ids[name] for name in task.depends_on]
        ids[task.name] = exp.add(task_config(task), executor=executor_for(task), name=task.name,
                                 dependencies=deps or None, tail_logs=False)


def task_record(task: PlannedTask) -> Path:
    """What a task leaves behind when it finished: the launcher's proof of success."""
    return rundir.stage_record(task.spec, task.stage, task.target)


def executor_factory(kind: str, profile_name, base_dir: Path):
    """`profile_name`: a name or path of slurm/*.yaml, or an already loaded SlurmProfile."""
    from jp_peft.cluster.executors import SlurmProfile, load_profile, local_executor, slurm_executor

    if kind == "local":
        def for_task(task: PlannedTask):
            needs = backend_of(task.spec).launch_needs(task.spec, task.stage)
            # torchrun for distributed ranks (GPUs, or gloo ranks on CPU); one CPU process NeMo sets up by itself,
            # and a stop reaches it directly
            one_cpu_process = needs.on_cpu and needs.nodes * needs.processes_per_node == 1
            return local_executor(devices=needs.processes_per_node, torchrun=needs.distributed and not one_cpu_process)
        return for_task

    profile = profile_name if isinstance(profile_name, SlurmProfile) else load_profile(profile_name)

    def for_task(task: PlannedTask):
        needs = backend_of(task.spec).launch_needs(task.spec, task.stage)
        if needs.distributed:
            return slurm_executor(profile, str(base_dir / "experiments"), torchrun=True, nodes=needs.nodes,
                                  gpus_per_node=needs.processes_per_node, on_cpu=needs.on_cpu)
        # one-process stages: one node, one task. hf training takes one GPU of a training node (if it has them);
        # the light stages (import, data, export, eval) the profile's light_* request
        light = stage_row(task.stage).kind != TRAIN
        gpus = min(profile.gpus_per_node, 1)
        return slurm_executor(profile, str(base_dir / "experiments"), torchrun=False, nodes=1, gpus_per_node=gpus,
                              light=light)
    return for_task

"""Plan, build and launch an experiment on the local or Slurm executor, then report.

Used by experiments/qwen_lora_ja.py; separate from it so that everything a NeMo-Run task
points at is importable from the installed package.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from jp_peft import rundir
from jp_peft.experiment import PlannedTask, add_tasks, new_experiment, plan
from jp_peft.spec import TRAINED_STAGES as TRAINING


def task_record(task: PlannedTask) -> Path:
    """What a task leaves behind when it finished: the launcher's proof of success."""
    return rundir.stage_record(task.spec, task.stage, task.target)


def executor_factory(kind: str, profile_name, base_dir: Path):
    """`profile_name`: a name or path of slurm/*.yaml, or an already loaded SlurmProfile."""
    from jp_peft.executors import SlurmProfile, load_profile, local_executor, slurm_executor

    if kind == "local":
        def for_task(task: PlannedTask):
            megatron_training = task.spec.backend == "megatron" and task.stage in TRAINING
            devices = task.spec.cluster.gpus_per_node if megatron_training else 1
            return local_executor(devices=devices, torchrun=megatron_training)
        return for_task

    profile = profile_name if isinstance(profile_name, SlurmProfile) else load_profile(profile_name)

    def for_task(task: PlannedTask):
        spec = task.spec
        if spec.backend == "megatron" and task.stage in TRAINING:
            return slurm_executor(profile, str(base_dir / "experiments"), torchrun=True,
                                  nodes=spec.cluster.num_nodes, gpus_per_node=spec.cluster.gpus_per_node,
                                  on_cpu=spec.cluster.accelerator == "cpu")
        # hf training and the light stages: one node, one task (one GPU if the partition has them).
        gpus = min(profile.gpus_per_node, 1)
        return slurm_executor(profile, str(base_dir / "experiments"), torchrun=False, nodes=1, gpus_per_node=gpus)
    return for_task


def launch(values: dict, overrides: list[str], sweep: list[str], stages: list[str] | None, *, executor: str,
           profile: str, dryrun: bool, wait: bool, recipes) -> int:
    """`recipes`: the recipe module that composes the NeMo calls of Megatron tasks (recipes.qwen25_500m_ja)."""
    tasks = plan(values, overrides, sweep, stages)
    first = tasks[0].spec
    print(f"experiment {first.group_name}: {len(tasks)} tasks on the {executor} executor ({first.backend} backend)")
    for task in tasks:
        after = f" after {', '.join(task.depends_on)}" if task.depends_on else ""
        print(f"  {task.name}{after}")
    if dryrun:
        return show_dryrun(tasks, executor, profile, recipes)
    base_dir = rundir.launches_dir(first)
    base_dir.mkdir(parents=True, exist_ok=True)
    for spec in {t.spec.run_dir: t.spec for t in tasks}.values():  # the resolved spec, for reruns and comparison
        rundir.write_json(rundir.spec_file(spec), spec.to_dict())
    exp = new_experiment(first.group_name, base_dir)
    with exp:
        add_tasks(exp, tasks, executor_factory(executor, profile, base_dir), recipes)
        started = time.perf_counter()
        exp.run(sequential=False, detach=(executor == "slurm"), tail_logs=False)
    if executor == "slurm":
        return follow_slurm(tasks, exp, wait, started)
    return report(tasks, exp, time.perf_counter() - started)


def follow_slurm(tasks: list[PlannedTask], exp, wait: bool, started: float) -> int:
    """Print each task's job id and log; with --wait, follow them to the end (scontrol, no sacct needed)."""
    from jp_peft.slurm_jobs import job_id_of, wait_for

    jobs = {job.id: job_id_of(job.handle) for job in exp.jobs}
    for job in exp.jobs:
        print(f"  {job.id}: slurm job {jobs[job.id]}, log {job.executor.job_details.stdout}")
    if not wait:
        print("submitted; follow with `squeue`, or rerun with --wait")
        return 0
    states = wait_for(jobs)
    for job in exp.jobs:
        state, reason = states[job.id]
        if state != "COMPLETED":
            print(f"FAILED: {job.id}: {state} ({reason}); log: {job.executor.job_details.stdout}", file=sys.stderr)
    return report(tasks, exp, time.perf_counter() - started)


def report(tasks: list[PlannedTask], exp, seconds: float) -> int:
    failed = [t for t in tasks if not task_record(t).exists()]
    for task in failed:
        print(f"FAILED: {task.name}: {task_record(task)} was not written; log: {task_log(exp, task)}",
              file=sys.stderr)
    for spec in {t.spec.run_dir: t.spec for t in tasks if t.stage == "eval"}.values():
        summary_path = spec.run_dir / "summary.json"
        if summary_path.exists():
            from jp_peft.stages import format_summary

            print(format_summary(json.loads(summary_path.read_text(encoding="utf-8"))))
            print(f"  metrics: {spec.run_dir}/<stage>/metrics.json; W&B: {spec.run_dir / 'wandb'}")
    print(f"{len(tasks) - len(failed)}/{len(tasks)} tasks finished in {seconds:.0f} s")
    return 1 if failed else 0


def task_log(exp, task: PlannedTask) -> str:
    job_dir = Path(exp._exp_dir) / task.name
    logs = sorted(job_dir.glob("**/*log*")) if job_dir.exists() else []
    return str(logs[0]) if logs else str(job_dir)


def render_sbatch_scripts(tasks: list[PlannedTask], profile, recipes) -> dict[str, str]:
    """The sbatch script NeMo-Run would submit for each task (a dry run; nothing is submitted)."""
    first = tasks[0].spec
    base_dir = rundir.launches_dir(first)
    exp = new_experiment(first.group_name, base_dir)
    with exp:
        add_tasks(exp, tasks, executor_factory("slurm", profile, base_dir), recipes)
        exp.dryrun(log=False, exist_ok=True, delete_exp_dir=False)
        scripts = {}
        for job in exp.jobs:
            path = Path(exp._exp_dir) / f"{job.executor.job_name}_sbatch.sh"
            scripts[job.id] = path.read_text(encoding="utf-8")
    return scripts


def show_dryrun(tasks: list[PlannedTask], executor: str, profile, recipes) -> int:
    """Every task's composed configuration (for Megatron stages the whole NeMo recipe: llm.finetune,
    model config, LoRA, data module, trainer, strategy, optimizer, logger, resume) and its executor.
    Writes nothing under the run directories: a finished run stays as it is."""
    import tempfile

    from jp_peft.experiment import task_config

    with tempfile.TemporaryDirectory(prefix="jp-peft-dryrun-") as scratch:
        executor_for = executor_factory(executor, profile, Path(scratch))
        for task in tasks:
            print(f"\n=== {task.name} ({task.stage}{' ' + task.target if task.target else ''}) ===")
            print(format_config(task_config(task, recipes)))
            print(f"executor: {executor_for(task)!r}")
    return 0


def format_config(config) -> str:
    """A NeMo-Run Config/Partial tree as indented text, one field per line, never wrapped."""
    import fiddle as fdl

    def render(node, indent: int) -> list[str]:
        pad = "  " * indent
        if isinstance(node, fdl.Buildable):
            target = fdl.get_callable(node)
            kind = "Partial" if isinstance(node, fdl.Partial) else "Config"
            lines = [f"{kind}[{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', target)}]"]
            for name, value in fdl.ordered_arguments(node).items():
                sub = render(value, indent + 1)
                lines.append(f"{pad}  {name} = {sub[0]}")
                lines += sub[1:]
            return lines
        if isinstance(node, (list, tuple)) and any(isinstance(v, fdl.Buildable) for v in node):
            lines = ["["]
            for value in node:
                sub = render(value, indent + 1)
                lines.append(f"{pad}  - {sub[0]}")
                lines += sub[1:]
            return lines + [f"{pad}]"]
        if isinstance(node, dict) and len(repr(node)) > 100:  # the spec: one key per line
            lines = ["{"]
            for key, value in node.items():
                lines.append(f"{pad}  {key!r}: {value!r}")
            return lines + [f"{pad}}}"]
        return [repr(node)]

    return "\n".join(render(config, 0))

"""Plan, build and launch an experiment on the local or Slurm executor, then report.

Used by experiments/qwen_lora_ja.py; separate from it so that everything a NeMo-Run task
points at is importable from the installed package.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from jp_peft.experiment import PlannedTask, add_tasks, new_experiment, plan

# What each stage leaves behind when it finished: the launcher's proof of success.
STAGE_OUTPUT = {
    "import": lambda t: t.spec.group_dir / "import" / "base.json",
    "data": lambda t: t.spec.group_dir / "data" / "prepared.json",
    # hf: the stage writes metrics.json; Megatron: NeMo writes checkpoints (metrics.json comes with the export)
    "cpt": lambda t: t.spec.run_dir / "cpt" / ("metrics.json" if t.spec.backend == "hf" else "checkpoints"),
    "sft": lambda t: t.spec.run_dir / "sft" / ("metrics.json" if t.spec.backend == "hf" else "checkpoints"),
    "export": lambda t: t.spec.run_dir / t.target / "export_check.json",
    "eval": lambda t: t.spec.run_dir / "summary.json",
}
TRAINING = ("cpt", "sft")


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
                                  nodes=spec.cluster.num_nodes, gpus_per_node=spec.cluster.gpus_per_node)
        # hf training and the light stages: one node, one task (one GPU if the partition has them).
        gpus = min(profile.gpus_per_node, 1)
        return slurm_executor(profile, str(base_dir / "experiments"), torchrun=False, nodes=1, gpus_per_node=gpus)
    return for_task


def launch(values: dict, overrides: list[str], sweep: list[str], stages: list[str] | None, *, executor: str,
           profile: str, dryrun: bool, wait: bool) -> int:
    tasks = plan(values, overrides, sweep, stages)
    first = tasks[0].spec
    # Not ".../nemo_run": NeMo-Run rewrites every "/nemo_run" in a bare-metal sbatch script to the job dir.
    base_dir = first.group_dir / "launches"
    base_dir.mkdir(parents=True, exist_ok=True)
    for spec in {t.spec.run_dir: t.spec for t in tasks}.values():  # the resolved spec, for reruns and comparison
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        (spec.run_dir / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2) + "\n", encoding="utf-8")
    print(f"experiment {first.group_name}: {len(tasks)} tasks on the {executor} executor ({first.backend} backend)")
    for task in tasks:
        after = f" after {', '.join(task.depends_on)}" if task.depends_on else ""
        print(f"  {task.name}{after}")
    exp = new_experiment(first.group_name, base_dir)
    with exp:
        add_tasks(exp, tasks, executor_factory(executor, profile, base_dir))
        if dryrun:
            exp.dryrun(delete_exp_dir=True)
            return 0
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
    failed = [t for t in tasks if not STAGE_OUTPUT[t.stage](t).exists()]
    for task in failed:
        print(f"FAILED: {task.name}: {STAGE_OUTPUT[task.stage](task)} was not written; log: {task_log(exp, task)}",
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


def render_sbatch_scripts(tasks: list[PlannedTask], profile) -> dict[str, str]:
    """The sbatch script NeMo-Run would submit for each task (a dry run; nothing is submitted)."""
    first = tasks[0].spec
    base_dir = first.group_dir / "launches"
    exp = new_experiment(first.group_name, base_dir)
    with exp:
        add_tasks(exp, tasks, executor_factory("slurm", profile, base_dir))
        exp.dryrun(log=False, exist_ok=True, delete_exp_dir=False)
        scripts = {}
        for job in exp.jobs:
            path = Path(exp._exp_dir) / f"{job.executor.job_name}_sbatch.sh"
            scripts[job.id] = path.read_text(encoding="utf-8")
    return scripts

"""`--dryrun`: what an experiment would run, printed for a person, and the sbatch scripts it would submit."""

from __future__ import annotations

from pathlib import Path

from jp_peft.records import layout as rundir
from jp_peft.run.plan import PlannedTask, add_tasks, executor_factory, new_experiment, task_record
from jp_peft.spec.stages import TRAIN as TRAIN_KIND, stage as stage_row


def render_sbatch_scripts(tasks: list[PlannedTask], profile, base_dir: Path | None = None) -> dict[str, str]:
    """The sbatch script NeMo-Run would submit for each task, keyed by task name (a dry run; nothing
    is submitted). NeMo-Run writes the scripts under `base_dir` (default: the run's launches dir)."""
    first = tasks[0].spec
    base_dir = base_dir or rundir.launches_dir(first)
    exp = new_experiment(first.group_name, base_dir)
    with exp:
        add_tasks(exp, tasks, executor_factory("slurm", profile, base_dir))
        exp.dryrun(log=False, exist_ok=True, delete_exp_dir=False)
        scripts = {}
        for job in exp.jobs:
            path = Path(exp._exp_dir) / f"{job.executor.job_name}_sbatch.sh"
            scripts[job.id] = path.read_text(encoding="utf-8")
    return scripts


def show_dryrun(tasks: list[PlannedTask], executor: str, profile, verbose: bool = False) -> int:
    """What would run, for a person to read: each run's resolved spec once (YAML; a sweep's other variants by
    the fields they change), then per task whether it would run or is done, its executor in one line and its
    composed configuration (for Megatron stages the whole NeMo recipe: llm.finetune, model config, LoRA, data
    module, trainer, strategy, optimizer, logger, resume; for hf training the stage's spec section).
    `verbose`: executors in full, the spec inside every task, and the sbatch scripts. Writes nothing under the
    run directories: a finished run stays as it is."""
    import tempfile

    import yaml

    from jp_peft.records.fingerprint import differences, finished_earlier, fingerprint
    from jp_peft.run.plan import task_config

    specs = list({t.spec.run_dir: t.spec for t in tasks}.values())
    print(f"\n=== resolved spec of {specs[0].name} ===")
    print(yaml.safe_dump(specs[0].to_dict(), sort_keys=False, allow_unicode=True).rstrip())
    for spec in specs[1:]:
        print(f"\n=== {spec.name}: the same except ===")
        print("\n".join(differences(specs[0].to_dict(), spec.to_dict())))
    with tempfile.TemporaryDirectory(prefix="jp-peft-dryrun-") as scratch:
        executor_for = executor_factory(executor, profile, Path(scratch))
        for task in tasks:
            done = not stage_row(task.stage).shared and \
                finished_earlier(task_record(task), fingerprint(task.spec, task.stage))
            print(f"\n=== {task.name} ({task.stage}{' ' + task.target if task.target else ''}): "
                  f"{'done earlier with this spec: kept' if done else 'would run'} ===")
            chosen = executor_for(task)
            print(f"executor: {chosen!r}" if verbose else f"executor: {executor_summary(chosen)}")
            config = task_config(task)
            if not verbose:  # the spec was printed once above
                config.spec = f"<the resolved spec of {task.spec.name}, above>"
            print(format_config(config))
            section = stage_row(task.stage).section
            if config.recipe is None and stage_row(task.stage).kind == TRAIN_KIND and section:
                print(f"  {task.spec.backend} backend trains the {section} section:")
                print(yaml.safe_dump({section: task.spec.to_dict()[section]}, sort_keys=False).rstrip())
        if executor == "slurm":  # what sbatch would receive, rendered in the scratch dir
            scripts = render_sbatch_scripts(tasks, profile, Path(scratch) / "sbatch")
            if not verbose:
                print(f"\n{len(scripts)} sbatch scripts: --dryrun --verbose prints them")
            for name, script in scripts.items() if verbose else ():
                print(f"\n=== {name}: sbatch script ===\n{script}")
    return 0


def executor_summary(chosen) -> str:
    """An executor in one line: its kind and the fields a person checks (nodes, tasks, GPUs, partition, time)."""
    fields = ("nodes", "ntasks_per_node", "gpus_per_node", "partition", "account", "time", "container_image")
    shown = [f"{name}={getattr(chosen, name)}" for name in fields if getattr(chosen, name, None) not in (None, "", [])]
    launcher = getattr(chosen, "launcher", None)
    if launcher is not None:
        shown.append(f"launcher={launcher if isinstance(launcher, str) else type(launcher).__name__}")
    return f"{type(chosen).__name__}({', '.join(shown)})"


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

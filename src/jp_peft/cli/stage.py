"""`jp-peft stage`: one stage of a resolved experiment, in this process, exactly as its NeMo-Run task runs it."""

from __future__ import annotations

import sys

from jp_peft.spec.stages import EVAL, EXPORT, STAGES, TRAINED_STAGES, stage as stage_row


def add_parser(sub) -> None:
    stage = sub.add_parser("stage", help="run one stage of a resolved experiment in this process (debugging, Slurm)",
                           description="The experiment script writes DIR/NAME/spec.json; this runs one of its stages "
                           "here, exactly as a NeMo-Run task would. A stage with a checkpoint resumes from it.")
    stage.add_argument("stage", choices=STAGES)
    stage.add_argument("--spec", required=True, help="DIR/NAME/spec.json")
    stage.add_argument("--target", choices=TRAINED_STAGES, help="export: which trained stage")

    stage.set_defaults(handler=cmd_stage)


def cmd_stage(args) -> int:
    """One stage in this process, exactly as its NeMo-Run task runs it (the same task config, built)."""
    if stage_row(args.stage).kind == EXPORT and args.target is None:
        print(f"error: stage {args.stage}: --target {'|'.join(TRAINED_STAGES)} is required (the trained stage "
              "whose export to check)", file=sys.stderr)
        return 2
    import fiddle as fdl

    from jp_peft.backends import backend_of
    from jp_peft.run.plan import PlannedTask, task_config
    from jp_peft.spec import SpecError, read_spec_file

    # What the launcher checks before it starts a stage, checked here too: this command is also run by hand
    try:
        spec = read_spec_file(args.spec)
        backend_of(spec).validate(spec)
        if stage_row(args.stage).kind == EVAL:
            from jp_peft.run.launch import check_eval_tasks

            check_eval_tasks([spec], dryrun=False)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from jp_peft.training.interrupt import StageInterrupted

    task = PlannedTask(f"{spec.name}-{args.stage}", args.stage, spec, [], target=args.target)
    try:
        fdl.build(task_config(task))()
    except StageInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 3
    return 0

"""The small subcommands: `jp-peft compare`, `status`, `eval`, `export`, `spec fields`, `wandb sync`,
`wandb workspace` (each runs code of its package)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


WORKSPACE_DESCRIPTION = """\
Builds a W&B workspace (wandb-workspaces) for one experiment's runs, filtered to their W&B group:
  - JA and EN validation loss against consumed tokens, a line per swept value and stage
  - JA gain against EN forgetting per run: perplexity (each stage against its start) and task points
    (each trained model against base)
  - the downstream task tables of base, cpt, sft and the JA/EN task averages
  - tokens/s, MFU (GPU runs), TFLOP/s and the learning rate against trainer/global_step
The runs are grouped by the swept field(s), then by stage (W&B job type), and coloured by the swept value.
Project, entity and group are the runs' W&B identity (their spec's wandb section and group).

Offline (no WANDB_API_KEY, or WANDB_MODE=offline) it writes the workspace definition, wandb-workspaces'
own View model as JSON, and prints the path; upload the runs themselves with `jp-peft wandb sync DIR`.
With WANDB_API_KEY it saves the workspace to W&B and prints its URL (that path needs the network and a key,
so the tests do not exercise it). Exit 2 with one line naming the path or field on bad input."""


def add_parsers(sub) -> None:
    export = sub.add_parser("export", help="export NeMo checkpoints").add_subparsers(dest="export_command", required=True)
    adapter = export.add_parser("adapter", help="NeMo Qwen2 LoRA checkpoint -> Hugging Face PEFT adapter")
    adapter.add_argument("--checkpoint", required=True)
    adapter.add_argument("--output", required=True)
    adapter.add_argument("--base-model", help="base_model_name_or_path written to adapter_config.json (hub id or "
                         "local HF directory; default: guessed by NeMo from the checkpoint's import path)")
    nemo = export.add_parser("nemo", help="NeMo 2 checkpoint directory -> single-file .nemo archive (verified)")
    nemo.add_argument("--checkpoint", required=True)
    nemo.add_argument("--output", required=True)

    for name in ("adapter", "nemo"):
        export.choices[name].set_defaults(handler=cmd_export)
    gguf = export.add_parser("gguf", help="a finished stage's export -> GGUF for llama.cpp (merged model, and its "
                             "lora adapter against a GGUF of its base), checked in llama-cpp-python against HF",
                             description="Needs `make deploy-tools` once (llama.cpp's converters and "
                             "llama-cpp-python, built into the cache). Writes RUN_DIR/STAGE/gguf/ and records the "
                             "files and checks in RUN_DIR/STAGE/export.json.")
    gguf.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (OUTPUT_DIR/NAME) whose STAGE was exported")
    gguf.add_argument("--stage", required=True, help="the trained stage: cpt, sft or dpo")
    gguf.add_argument("--type", default="f16", help="comma-separated GGUF types of the merged model: f16, q8_0 "
                      "(default: %(default)s); the adapter is always f16")
    gguf.set_defaults(handler=cmd_export_gguf)

    compare = sub.add_parser("compare", help="compare finished runs: Markdown/HTML table and PNG plots")
    compare.add_argument("runs", nargs="+", help="run directories (DIR/NAME)")
    compare.add_argument("--output", default="runs/compare",
                         help="report directory (default: %(default)s, relative to the current directory)")
    compare.set_defaults(handler=cmd_compare)

    status = sub.add_parser("status", help="a run's stages: done, unfinished (step, loss, tokens/s, ETA), not started; "
                            "its lock holder and Slurm jobs")
    status.add_argument("run_dir", type=Path, help="a run directory, e.g. runs/smoke")
    status.set_defaults(handler=cmd_status)
    from jp_peft.evaluation.cli import DESCRIPTION as EVAL_DESCRIPTION, EPILOG as EVAL_EPILOG, add_eval_arguments

    evaluation = sub.add_parser("eval", help="score a model/adapter on downstream tasks (lm-eval, offline)",
                                description=EVAL_DESCRIPTION, epilog=EVAL_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(evaluation)
    evaluation.set_defaults(handler=cmd_eval)

    wandb = sub.add_parser("wandb", help="W&B helpers").add_subparsers(dest="wandb_command", required=True)
    sync = wandb.add_parser("sync", help="upload offline runs under DIR (needs WANDB_API_KEY)")
    sync.add_argument("dir")
    sync.set_defaults(handler=cmd_wandb_sync)
    workspace = wandb.add_parser(
        "workspace", help="a saved W&B workspace for an experiment's runs (their W&B group)",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=WORKSPACE_DESCRIPTION,
        epilog="examples:\n  jp-peft wandb workspace runs/smoke-replay_ratio0 runs/smoke-replay_ratio0.3\n"
               "  jp-peft wandb workspace runs/smoke-rank8 runs/smoke-rank16 --group-by lora.rank")
    workspace.add_argument("runs", nargs="+", help="run directories (DIR/NAME) of one experiment: every run of the sweep")
    workspace.add_argument("--group-by", action="append", default=[], metavar="FIELD",
                           help="a spec field to group and colour the runs by (repeat for several; default: the "
                                "swept fields, those the runs differ in and are named after)")
    workspace.add_argument("--output", help="offline: the file to write (default: DIR/GROUP/wandb_workspace.json, "
                           "next to the runs)")
    workspace.set_defaults(handler=cmd_wandb_workspace)

    spec = sub.add_parser("spec", help="the experiment spec's fields").add_subparsers(dest="spec_command", required=True)
    spec.add_parser("fields", help="every spec field: dotted name, type, default and what it does").set_defaults(
        handler=cmd_spec_fields)


def cmd_export(args) -> int:
    from jp_peft.cli.export import run_export_command

    return run_export_command(args)


def cmd_export_gguf(args) -> int:
    from jp_peft.cli.export import run_gguf_command

    return run_gguf_command(args)


def cmd_compare(args) -> int:
    from jp_peft.compare import compare_runs
    from jp_peft.records.layout import MissingRecord

    try:
        out = compare_runs(args.runs, args.output)
    except MissingRecord as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for warning in out["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {out['markdown']}, {out['html']} and {len(out['plots'])} plots")
    return 0


def cmd_status(args) -> int:
    from jp_peft.run.status import status_lines
    from jp_peft.spec import SpecError

    try:
        print("\n".join(status_lines(args.run_dir)))
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_eval(args) -> int:
    from jp_peft.evaluation.cli import run_eval_command

    return run_eval_command(args)


def cmd_wandb_sync(args) -> int:
    from jp_peft.training.wandb_run import sync_offline_runs

    return sync_offline_runs(args.dir)


def cmd_wandb_workspace(args) -> int:
    from jp_peft.wandb_workspace import workspace_command

    return workspace_command(args.runs, args.output, args.group_by)


def cmd_spec_fields(args) -> int:
    from jp_peft.spec.reference import format_fields

    print(format_fields())
    return 0

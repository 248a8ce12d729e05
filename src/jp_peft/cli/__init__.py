"""`jp-peft`: the command line. Every subcommand imports its heavy dependencies lazily,
so `jp-peft --help` answers at once."""

from __future__ import annotations

import argparse
import sys

from jp_peft.cli import commands, data, serve, stage

EPILOG = """examples:
  jp-peft data prepare --input data/ja/cpt.train.jsonl --format text --tokenizer /models/Qwen2.5-0.5B \\
      --output-prefix /data/ja_cpt --workers 8
  jp-peft data prepare --input /corpus/ja/*.jsonl.gz --tokenizer /models/Qwen2.5-0.5B \\
      --output-prefix /shared/ja_cpt --executor slurm --slurm-profile baremetal_venv --tasks 400
  jp-peft data blend data/blends/ja90_en10.yaml --train-tokens 32768000
  jp-peft export adapter --checkpoint runs/x/cpt/checkpoints/... --output runs/x/cpt/hf_adapter
  jp-peft export nemo --checkpoint runs/x/cpt/checkpoints/... --output runs/x/cpt/model.nemo
  jp-peft export gguf runs/smoke --stage sft --type f16,q8_0   # after make deploy-tools
  jp-peft serve runs/smoke --stage sft       # the vLLM command (--run starts it, --check verifies it)
  jp-peft compare runs/smoke runs/smoke-rank8 --output runs/compare
  jp-peft eval fetch-data /data/lm-eval        # the production tasks' data, on a machine with network
  jp-peft wandb sync runs/smoke
  jp-peft wandb workspace runs/smoke-replay_ratio0 runs/smoke-replay_ratio0.3
The experiment itself: jp-peft run --help (= python experiments/qwen_lora_ja.py --help)"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jp-peft")
    except PackageNotFoundError:  # a checkout on sys.path, not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jp-peft", description="LoRA continual learning of Qwen2.5-0.5B on "
                                     "Japanese: data preparation, export, comparison.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"jp-peft {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run an experiment: one spec -> import, data, cpt, sft, export, eval (jp-peft run --help)",
                   add_help=False)

    data.add_parser(sub)
    commands.add_parsers(sub)
    stage.add_parser(sub)
    serve.add_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"]:  # its own parser: the experiment's flags and free KEY=VALUE overrides
        from jp_peft.cli.run import main as run_main

        return run_main(argv[1:])
    if argv[:2] == ["eval", "fetch-data"]:  # beside `jp-peft eval --model ...`, whose options it does not share
        from jp_peft.evaluation.fetch_data import main as fetch_main

        return fetch_main(argv[2:])
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

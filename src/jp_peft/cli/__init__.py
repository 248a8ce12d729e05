"""`jp-peft`: the command line. Every subcommand imports its heavy dependencies lazily,
so `jp-peft --help` answers at once."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jp_peft.spec.stages import EVAL, EXPORT, STAGES, TRAINED_STAGES, stage as stage_row

EPILOG = """examples:
  jp-peft data prepare --input data/ja/cpt.train.jsonl --format text --tokenizer /models/Qwen2.5-0.5B \\
      --output-prefix /data/ja_cpt --workers 8
  jp-peft data prepare --input /corpus/ja/*.jsonl.gz --tokenizer /models/Qwen2.5-0.5B \\
      --output-prefix /shared/ja_cpt --executor slurm --slurm-profile baremetal_venv --tasks 400
  jp-peft data blend data/blends/ja90_en10.yaml --train-tokens 32768000
  jp-peft export adapter --checkpoint runs/x/cpt/checkpoints/... --output runs/x/cpt/hf_adapter
  jp-peft export nemo --checkpoint runs/x/cpt/checkpoints/... --output runs/x/cpt/model.nemo
  jp-peft compare runs/smoke runs/smoke-rank8 --output runs/compare
  jp-peft wandb sync runs/smoke
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

    data = sub.add_parser("data", help="prepare corpora and inspect blends").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="validate, clean, dedup and tokenise raw data",
                           description="Every input record is kept or rejected with a reason: rejects go verbatim "
                           "to PREFIX.rejected.jsonl (field raw; raw_b64 holds the exact bytes of a record that "
                           "is not valid UTF-8), counts to PREFIX.report.json (read = kept + rejected). "
                           "text -> PREFIX_text_document.bin/.idx (Megatron indexed dataset, EOS appended); "
                           "alpaca/chatml -> PREFIX/training.jsonl, PREFIX/validation.jsonl (Qwen ChatML "
                           "input/output, loss on assistant tokens). No output may be an input. Exit status: "
                           "0 done; 1 --strict stopped at a reject, nothing was kept, or a worker died; 2 a bad "
                           "argument, tokenizer or unreadable input (nothing written); 143 SIGTERM (temporary "
                           "files removed). The work runs as datatrove stages over --tasks shards, on this "
                           "machine or as Slurm array jobs; a rerun after an interruption continues from the "
                           "finished shards kept in its work directory. See data/README.md.")
    prep.add_argument("--input", nargs="+", required=True, metavar="PATH",
                      help="JSONL, plain text (blank-line separated documents), or gzip of either")
    prep.add_argument("--format", choices=("text", "alpaca", "chatml"), default="text")
    prep.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory or hub id")
    prep.add_argument("--output-prefix", required=True)
    prep.add_argument("--workers", type=int, default=1, help="--executor local: tasks run at once, one process each "
                      "(default 1; capped at the usable cores and, for a short input, at its chunks of 64 records)")
    prep.add_argument("--executor", choices=("local", "slurm"), default="local",
                      help="local: datatrove's local executor; slurm: one Slurm array job per stage (default local)")
    prep.add_argument("--tasks", type=int, metavar="N", help="shards of the input, one task each per stage (default: "
                      "--workers, and at least one per 256 MiB of input); the outputs do not depend on it")
    prep.add_argument("--slurm-profile", metavar="NAME", help="--executor slurm: slurm/NAME.yaml or a profile path "
                      "(default: the partition of the Slurm job this runs in)")
    prep.add_argument("--work-dir", metavar="DIR", help="intermediate files and finished-task marks, removed at the "
                      "end (default: PREFIX.work with --executor slurm, which the nodes must share; locally a "
                      "directory of PREFIX under $JP_PEFT_CACHE, ~/.cache/jp-peft)")
    prep.add_argument("--keep-work-dir", action="store_true", help="keep the work directory after a successful run")
    prep.add_argument("--strict", action="store_true", help="stop at the first rejected record (exit 1, naming file:line)")
    prep.add_argument("--min-chars", type=int, default=None, help="shorter documents are rejected (default 20; 2 for instructions)")
    prep.add_argument("--max-chars", type=int, default=200_000)
    prep.add_argument("--min-ja-ratio", type=float, default=None,
                      help="minimum hiragana/katakana/kanji share (default 0.3 for text, 0 for instructions; 0 disables)")
    prep.add_argument("--no-dedup", action="store_true", help="keep exact and near duplicates")
    prep.add_argument("--no-near-dedup", action="store_true", help="exact dedup only (MinHash index memory grows with kept docs)")
    prep.add_argument("--near-dedup-threshold", type=float, default=0.8,
                      help="estimated Jaccard over char 5-grams, in (0, 1] (default 0.8)")
    prep.add_argument("--val-fraction", type=float, default=0.0,
                      help="share of documents (by content hash, deterministic) written to the validation split")
    prep.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    prep.add_argument("--progress-interval", type=float, metavar="SECONDS",
                      help="seconds between progress lines: records read/kept/rejected, MB/s, ETA (default: 1, "
                      "redrawn, on a terminal; 30, one line each, when stderr is a log file)")

    blend = data.add_parser("blend", help="effective token ratio and epochs of a CPT blend")
    blend.add_argument("blend", help="blend YAML (datasets: name, weight, prefix)")
    blend.add_argument("--train-tokens", type=int, help="tokens a training run consumes (steps x global batch x seq)")
    blend.add_argument("--group-dir", default="runs/qwen_lora_ja", help="value of {group_dir} in the blend")

    export = sub.add_parser("export", help="export NeMo checkpoints").add_subparsers(dest="export_command", required=True)
    adapter = export.add_parser("adapter", help="NeMo Qwen2 LoRA checkpoint -> Hugging Face PEFT adapter")
    adapter.add_argument("--checkpoint", required=True)
    adapter.add_argument("--output", required=True)
    adapter.add_argument("--base-model", help="base_model_name_or_path written to adapter_config.json (hub id or "
                         "local HF directory; default: guessed by NeMo from the checkpoint's import path)")
    nemo = export.add_parser("nemo", help="NeMo 2 checkpoint directory -> single-file .nemo archive (verified)")
    nemo.add_argument("--checkpoint", required=True)
    nemo.add_argument("--output", required=True)

    compare = sub.add_parser("compare", help="compare finished runs: Markdown/HTML table and PNG plots")
    compare.add_argument("runs", nargs="+", help="run directories (DIR/NAME)")
    compare.add_argument("--output", default="runs/compare")

    stage = sub.add_parser("stage", help="run one stage of a resolved experiment in this process (debugging, Slurm)",
                           description="The experiment script writes DIR/NAME/spec.json; this runs one of its stages "
                           "here, exactly as a NeMo-Run task would. A stage with a checkpoint resumes from it.")
    stage.add_argument("stage", choices=STAGES)
    stage.add_argument("--spec", required=True, help="DIR/NAME/spec.json")
    stage.add_argument("--target", choices=TRAINED_STAGES, help="export: which trained stage")

    from jp_peft.evaluation.cli import DESCRIPTION as EVAL_DESCRIPTION, EPILOG as EVAL_EPILOG, add_eval_arguments

    status = sub.add_parser("status", help="a run's stages: done, unfinished (step, loss, tokens/s, ETA), not started; "
                            "its lock holder and Slurm jobs")
    status.add_argument("run_dir", type=Path, help="a run directory, e.g. runs/smoke")
    add_eval_arguments(sub.add_parser("eval", help="score a model/adapter on downstream tasks (lm-eval, offline)",
                                      description=EVAL_DESCRIPTION, epilog=EVAL_EPILOG,
                                      formatter_class=argparse.RawDescriptionHelpFormatter))

    wandb = sub.add_parser("wandb", help="W&B helpers").add_subparsers(dest="wandb_command", required=True)
    sync = wandb.add_parser("sync", help="upload offline runs under DIR (needs WANDB_API_KEY)")
    sync.add_argument("dir")
    return parser


def cmd_stage(args) -> int:
    """One stage in this process, exactly as its NeMo-Run task runs it (the same task config, built)."""
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


def cmd_data_prepare(args) -> int:
    from jp_peft.data.errors import ConfigError, PrepareError, StrictModeError
    from jp_peft.data.prepare import PrepareConfig
    from jp_peft.data.run import prepare

    instructions = args.format != "text"
    try:
        cfg = PrepareConfig(
            inputs=tuple(args.input), output_prefix=args.output_prefix, tokenizer=args.tokenizer, format=args.format,
            workers=args.workers, strict=args.strict,
            min_chars=args.min_chars if args.min_chars is not None else (2 if instructions else 20),
            max_chars=args.max_chars,
            min_ja_ratio=args.min_ja_ratio if args.min_ja_ratio is not None else (0.0 if instructions else 0.3),
            dedup=not args.no_dedup, near_dedup=not (args.no_dedup or args.no_near_dedup),
            near_dedup_threshold=args.near_dedup_threshold, val_fraction=args.val_fraction,
            progress=not args.no_progress, progress_interval=args.progress_interval, executor=args.executor,
            tasks=args.tasks, slurm_profile=args.slurm_profile, work_dir=args.work_dir,
            keep_work_dir=args.keep_work_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        report = prepare(cfg)
    except StrictModeError as exc:
        print(f"error: --strict: {exc}", file=sys.stderr)
        return 1
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rejected = ", ".join(f"{k} {v}" for k, v in report["rejected"].items() if v) or "none"
    print(f"read {report['read']}, kept {report['kept']} (train {report['kept_train']}, validation "
          f"{report['kept_validation']}), rejected {report['rejected_total']} ({rejected})")
    print(f"{report['chars']:,} characters, {report['tokens']:,} tokens, {report['chars_per_token']} characters/token, "
          f"{report['docs_per_second']} docs/s, {report['mb_per_second']} MB/s")
    print(f"{report['tasks']} shards on the {report['executor']} executor"
          + (f"; continued from an earlier run: {report['resumed']['tasks_finished_before']}" if report["resumed"] else "")
          + (f"; resubmitted after a failure: {report['retried']}" if report["retried"] else ""))
    for name, path in report["outputs"].items():
        print(f"  {name}: {path}")
    return 0


def cmd_data_blend(args) -> int:
    from jp_peft.data.blend import blend_report, load_blend_entries
    from jp_peft.spec import SpecError

    try:
        entries = load_blend_entries(args.blend, group_dir=args.group_dir)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(blend_report(entries, args.train_tokens), indent=2))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"]:  # its own parser: the experiment's flags and free KEY=VALUE overrides
        from jp_peft.cli.run import main as run_main

        return run_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "data" and args.data_command == "prepare":
        return cmd_data_prepare(args)
    if args.command == "data" and args.data_command == "blend":
        return cmd_data_blend(args)
    if args.command == "export":
        from jp_peft.export.cli import run_export_command

        return run_export_command(args)
    if args.command == "compare":
        from jp_peft.compare import compare_runs
        from jp_peft.records.layout import MissingRecord

        try:
            out = compare_runs(args.runs, args.output)
        except MissingRecord as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {out['markdown']}, {out['html']} and {len(out['plots'])} plots")
        return 0
    if args.command == "stage":
        if stage_row(args.stage).kind == EXPORT and args.target is None:
            print("error: stage export: --target cpt|sft is required (the trained stage whose export to check)",
                  file=sys.stderr)
            return 2
        return cmd_stage(args)
    if args.command == "status":
        from jp_peft.run.status import status_lines
        from jp_peft.spec import SpecError

        try:
            print("\n".join(status_lines(args.run_dir)))
        except SpecError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "eval":
        from jp_peft.evaluation.cli import run_eval_command

        return run_eval_command(args)
    if args.command == "wandb":
        from jp_peft.training.wandb_run import sync_offline_runs

        return sync_offline_runs(args.dir)
    return 2


if __name__ == "__main__":
    sys.exit(main())

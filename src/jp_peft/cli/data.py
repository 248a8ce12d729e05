"""`jp-peft data prepare` and `jp-peft data blend`."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="prepare corpora and inspect blends").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="validate, clean, dedup and tokenise raw data",
                           description="Every input record is kept or rejected with a reason: rejects go verbatim "
                           "to PREFIX.rejected.jsonl (field raw; raw_b64 holds the exact bytes of a record that "
                           "is not valid UTF-8), counts to PREFIX.report.json (read = kept + rejected). "
                           "text -> PREFIX_text_document.bin/.idx (Megatron indexed dataset, EOS appended); "
                           "alpaca/chatml -> PREFIX/training.jsonl, PREFIX/validation.jsonl (Qwen ChatML "
                           "input/output, loss on assistant tokens); preference -> the same files of ChatML "
                           "prompt/chosen/rejected pairs. No output may be an input. Exit status: "
                           "0 done; 1 --strict stopped at a reject, nothing was kept, or a worker died; 2 a bad "
                           "argument, tokenizer or unreadable input (nothing written); 143 SIGTERM (temporary "
                           "files removed). The work runs as datatrove stages over --tasks shards, on this "
                           "machine or as Slurm array jobs; a rerun after an interruption continues from the "
                           "finished shards kept in its work directory. See data/README.md.")
    prep.add_argument("--input", nargs="+", required=True, metavar="PATH",
                      help="JSONL, plain text (blank-line separated documents), or gzip of either")
    prep.add_argument("--format", choices=("text", "alpaca", "chatml", "preference"), default="text",
                      help="preference: prompt/chosen/rejected JSONL (strings or ChatML messages) -> "
                      "PREFIX/training.jsonl, PREFIX/validation.jsonl of ChatML pairs (the dpo stage's data)")
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

    prep.set_defaults(handler=cmd_data_prepare)
    blend.set_defaults(handler=cmd_data_blend)


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

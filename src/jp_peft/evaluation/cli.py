"""`jp-peft eval`: check the inputs, score, print the table, write OUTPUT/results.json."""

from __future__ import annotations

import sys
from pathlib import Path

DESCRIPTION = """Score a Hugging Face model (and optionally a PEFT adapter on it) on downstream tasks with
lm-evaluation-harness, offline. Tasks (comma-separated; sets expand):
  jpeft               the bundled sets, always available: jpeft_jcqa, jpeft_jnli, jpeft_marc, jpeft_en_mc
  ja_leaderboard      lm-eval's Japanese leaderboard, multiple choice (JCommonsenseQA, JNLI, MARC-ja, XWinograd)
  ja_leaderboard_gen  its generation tasks (JAQKET v2, JSQuAD, MGSM, XL-Sum), opt-in
  en                  English: hellaswag, arc_easy, xwinograd_en
Non-bundled tasks read DATA_DIR/<task>/<split>.jsonl (the Hub data set's rows; see
src/jp_peft/evaluation/README.md; `jp-peft eval fetch-data DATA_DIR` writes them on a machine with network);
a task without its data is refused, one line each, before any model loads. Bad input exits 2."""

EPILOG = """examples:
  jp-peft eval --model runs/smoke/sft/hf_merged --tasks jpeft_jcqa --limit 10 --output runs/smoke/eval/sft
  jp-peft eval --model /models/Qwen2.5-0.5B --adapter runs/x/cpt/hf_adapter --tasks jpeft,ja_leaderboard \\
      --data-dir /data/lm-eval --num-fewshot 3 --output runs/x/eval/cpt"""


def add_eval_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="Hugging Face model directory (config.json, weights, tokenizer)")
    parser.add_argument("--adapter", metavar="DIR", help="PEFT adapter directory, applied unmerged on --model")
    parser.add_argument("--tasks", required=True, metavar="T1,T2", help="comma-separated tasks or sets (see above)")
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="directory of your own lm-eval task YAMLs (repeatable)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="local data of non-bundled tasks: DATA_DIR/<task>/<split>.jsonl")
    parser.add_argument("--num-fewshot", type=int, metavar="N",
                        help="few-shot examples (default: each task's own, 0 if none)")
    parser.add_argument("--limit", type=float, metavar="N",
                        help="score only the first N items of each task (<1: a fraction)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="default 8")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=1234, help="python/numpy/torch/few-shot seed (default 1234)")
    parser.add_argument("--output", metavar="DIR", help="write OUTPUT/results.json (default: print only)")


def run_eval_command(args) -> int:
    from jp_peft.evaluation.harness import EvalInputError, check_model_dirs
    from jp_peft.evaluation.tasks import MissingTaskDataError, UnknownTaskError, check_available

    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    try:  # everything that can be wrong with the request, before anything heavy is imported
        check_model_dirs(args.model, args.adapter)
        check_available(args.tasks, args.data_dir, num_fewshot=args.num_fewshot, include_path=args.include_path)
    except (EvalInputError, UnknownTaskError, MissingTaskDataError) as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    from jp_peft.evaluation.harness import evaluate, format_table, write_results

    record = evaluate(args.model, args.adapter, args.tasks, num_fewshot=args.num_fewshot, limit=limit,
                      batch_size=args.batch_size, data_dir=args.data_dir, include_path=args.include_path,
                      device=args.device, seed=args.seed)
    print(format_table(record))
    if args.output:
        path = write_results(Path(args.output) / "results.json", record)
        print(f"wrote {path}")
    return 0

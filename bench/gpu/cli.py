"""bench/gpu_lora_throughput.py's arguments and main (its docstring is the --help text)."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

from bench.gpu import CONFIGS, REPO, BenchError, plan
from bench.gpu.results import summary_text


def parse_args(argv, description: str | None = None):
    parser = argparse.ArgumentParser(prog="gpu_lora_throughput.py", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="embedded tiny Qwen2 on CPU, a few steps (the tested path)")
    parser.add_argument("--hf-model", type=Path, help="a real Hugging Face checkpoint directory instead of random weights")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--seq", nargs="+", type=int, help="sequence lengths (default 2048; 128 with --tiny)")
    parser.add_argument("--micro-batches", nargs="+", type=int,
                        help="micro batch sweep, smallest first: every configuration runs the first, the others "
                        "while they fit and the time budget allows (default 4 8 16; 2 4 with --tiny)")
    parser.add_argument("--global-batch", type=int, help="sequences per optimizer step (at least the micro batch; "
                        "default 16, the preset's; 4 with --tiny)")
    parser.add_argument("--steps", type=int, help="optimizer steps of a sweep trial (default 20; 6 with --tiny)")
    parser.add_argument("--warmup", type=int, help="steps left out of the medians (default 5; 2 with --tiny)")
    parser.add_argument("--parity-steps", type=int, help="LoRA steps of the Megatron parity run, at Megatron's best "
                        "micro batch (default: --steps, so the first Megatron trial is the parity run: a device "
                        "run's 9 minutes leave no time for a separate one)")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (default 32)")
    parser.add_argument("--prompts", type=int, default=32, help="Japanese prompts of the logit comparison")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--time-budget", type=float, help="seconds the run should take: a sweep trial starts only if "
                        f"it and the parity still to come fit (default {plan.DEVICE_TIME_BUDGET_S} on a GPU, what "
                        f"the device command's {plan.DEVICE_LIMIT_S} s leave after the install; 1800 with --tiny)")
    parser.add_argument("--worker-timeout", type=float, default=900.0, help="seconds one worker process may run")
    parser.add_argument("--work-dir", type=Path, help="scratch directory (default: a new one under /tmp)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results", help="where the JSON goes")
    parser.add_argument("--dryrun", action="store_true", help="print the steps with their time budgets and the "
                        "device command, and exit (1 where the device run would not fit)")
    args = parser.parse_args(argv)
    defaults = {"seq": [128], "micro_batches": [2, 4], "global_batch": 4, "steps": 6, "warmup": 2,
                "time_budget": 1800.0} if args.tiny else {
        "seq": [2048], "micro_batches": [4, 8, 16], "global_batch": 16, "steps": 20, "warmup": 5,
        "time_budget": float(plan.DEVICE_TIME_BUDGET_S)}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.parity_steps is None:
        args.parity_steps = args.steps
    if args.tiny and args.hf_model:
        parser.error("--tiny trains the embedded tiny model; --hf-model is for the GPU run")
    if args.steps <= args.warmup + 1:
        parser.error(f"--steps {args.steps} leaves fewer than 2 steps after --warmup {args.warmup}")
    if len(set(args.micro_batches)) != len(args.micro_batches):
        parser.error("--micro-batches repeats a value")
    if args.work_dir is None and not args.dryrun:  # a dry run creates nothing, not even a scratch directory
        args.work_dir = Path(tempfile.mkdtemp(prefix="bench_gpu_lora_"))
    args.work_dir = args.work_dir.resolve() if args.work_dir else None
    args.results = args.results.resolve()
    return args


def _stop(signum, frame):
    """The device command's `timeout` sends SIGTERM at the budget's end: stop like Ctrl-C, so the
    worker's process group is killed and the results file records where the run stopped."""
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name} (the device command's timeout?)")


def main(argv=None, description: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        from bench.gpu.workers import worker_main

        return worker_main(argv[1])
    args = parse_args(argv, description)
    lines, fits = plan.render(args, argv)
    if args.dryrun:
        print("\n".join(lines))
        return 0 if fits else 1
    from bench.gpu.trials import Bench

    bench = Bench(args, argv)
    bench.say("plan:\n  " + "\n  ".join(lines[1:]))
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        bench.run()
    except BaseException as exc:  # noqa: BLE001 - a failed or interrupted run still leaves its results file
        step = bench.result["steps"][-1]["step"] if bench.result["steps"] else None
        failed = str(exc).split(":", 1)[0] if isinstance(exc, BenchError) else f"after {step or 'start'}"
        bench.result.update(failed_step=failed, error=f"{type(exc).__name__}: {exc}"[-8000:])
        bench.write()
        print(f"\nFAILED at step {failed!r}: {type(exc).__name__}: {exc}\nresults so far: {bench.path}",
              file=sys.stderr, flush=True)
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    bench.say(f"done in {bench.elapsed():.0f} s; results: {bench.path}")
    print(summary_text(bench.result))
    return 0

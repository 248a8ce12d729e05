"""The steps a run takes, the seconds each is budgeted on one H100/H200, and the one device command.

A device machine is lent for 15 minutes of which start-up takes some, so the whole device command
(install the carried wheels, then the benchmark) must end within DEVICE_LIMIT_S. The benchmark itself
gets `--time-budget` (default: what the install and the stop grace leave of it): a sweep point starts
only if it and the parity still to come fit (trials.Bench.sweep), and the device command's `timeout`
stops the rest, the results file keeping every finished step. `--dryrun` prints this plan.

The seconds are estimates until a GPU run's results (`steps`) record the real ones; correct them then.
"""

from __future__ import annotations

import math
import shlex
import subprocess

from bench.gpu import REPO

DEVICE_LIMIT_S = 540  # nine of the lease's 15 minutes: start-up, transfers and one re-run need the rest
STOP_GRACE_S = 10  # after a SIGTERM at the budget's end, time to write the results before SIGKILL
# Seconds each fixed step takes on one H100/H200 at the defaults:
ESTIMATE_S = {
    "install": 20,  # pip unpacking the 44 MiB of carried wheels with --no-compile (10 s on a 2-core VM)
    "environment": 15,  # importing nemo.collections.llm and the rest in a child process
    "base model": 30,  # 494M parameters initialised on CPU, saved as 2 GB of fp32 safetensors
    "import": 45,  # NeMo's HF -> NeMo conversion and save, with the import stage's logits check
    "data": 20,  # the bundled corpus through data prepare (normalise, dedup, tokenize, index)
    "export": 45,  # the parity run's hf-peft adapter, merged model, .nemo archive and export checks
    "parity": 90,  # CPU fp32: a merge, NeMo and HF+PEFT forwards on 32 x 64 tokens, an HF export
}
PARITY_CHECKS_S = ESTIMATE_S["export"] + ESTIMATE_S["parity"]
# A trial: start-up (interpreter and imports, the model on the GPU, data loaders, validation, the
# closing checkpoint) plus its steps at the tokens/s expected at seq 2048 (Megatron under the issue's
# 120k target, the other two at the rate a 3x target implies), scaled by FLOPs per token at other lengths.
TRIAL_STARTUP_S = {"megatron": 35, "hf_backend": 25, "plain_hf_peft": 15}
TOKENS_PER_S_2048 = {"megatron": 100_000, "hf_backend": 45_000, "plain_hf_peft": 40_000}
SWEEP_MARGIN = 1.2  # a sweep point is costed as its configuration's last trial x this (as trials.Bench does)
DEVICE_TIME_BUDGET_S = DEVICE_LIMIT_S - ESTIMATE_S["install"] - STOP_GRACE_S
WHEELS = ".whl"  # what bench/gpu/carry.sh fills and the device call carries
SITE = "/tmp/site"


def trial_seconds(args, config: str, seq: int, steps: int) -> float:
    from jp_peft.training.flops import QWEN25_05B, lora_flops_per_token
    from jp_peft.spec import HF_LORA_TARGETS

    def flops(s: int) -> float:
        return lora_flops_per_token(QWEN25_05B, s, args.rank, HF_LORA_TARGETS)

    tokens_per_s = TOKENS_PER_S_2048[config] * flops(2048) / flops(seq)
    return TRIAL_STARTUP_S[config] + steps * args.global_batch * seq / tokens_per_s


def steps(args) -> list[dict]:
    """The run's steps in the order trials.Bench runs them: {"step", "seconds"} (None: skipped, with
    "note" saying why). On the GPU a sweep point is kept only where the runtime rule would start it."""
    rows: list[dict] = []
    budget = None if args.tiny else args.time_budget

    def add(step: str, seconds: float | None, note: str = "") -> None:  # whole seconds, rounded up
        rows.append({"step": step, "seconds": None if args.tiny or seconds is None else math.ceil(seconds), "note": note})

    def elapsed() -> float:
        return sum(r["seconds"] or 0 for r in rows if r["step"] != "install")

    if not args.tiny:
        add(f"install the carried wheels ({WHEELS} -> {SITE})", ESTIMATE_S["install"])
    add(f"environment: what {', '.join(args.configs)} import" + ("" if args.tiny else "; CUDA"), ESTIMATE_S["environment"])
    source = "embedded tiny Qwen2" if args.tiny else args.hf_model or "Qwen2.5-0.5B config, random weights"
    add(f"model build: {source}", ESTIMATE_S["base model"])
    add("shared stage import (HF -> NeMo, with its logits check)", ESTIMATE_S["import"])
    add("shared stage data (the bundled Japanese/English CPT blend)", ESTIMATE_S["data"])
    reuse = args.parity_steps <= args.steps
    parity_due = "megatron" in args.configs
    for seq in args.seq:
        last = {}
        for config in args.configs:
            last[config] = trial_seconds(args, config, seq, args.steps)
            parity = parity_due and reuse and config == "megatron"
            add(f"{config} seq {seq} micro {args.micro_batches[0]}: {args.steps} steps"
                + (" (the parity run)" if parity else ""), last[config])
        reserve = 0.0
        if parity_due:
            reserve = PARITY_CHECKS_S + (0 if reuse else trial_seconds(args, "megatron", seq, args.parity_steps))
        for micro in args.micro_batches[1:]:
            for config in args.configs:
                step = f"{config} seq {seq} micro {micro}: {args.steps} steps"
                if budget is not None and elapsed() + last[config] * SWEEP_MARGIN + reserve > budget:
                    add(step, None, f"skipped: past the {budget:.0f} s budget")
                else:
                    add(step, last[config], "" if args.tiny else "if it fits in GPU memory")
        if parity_due:
            if not reuse:
                add(f"megatron seq {seq} at its best micro batch: {args.parity_steps} steps (the parity run)",
                    trial_seconds(args, "megatron", seq, args.parity_steps))
            add("export of the parity run (hf-peft adapter, merged model, .nemo, export checks)", ESTIMATE_S["export"])
            add(f"parity on CPU, fp32: NeMo vs HF+PEFT on {args.prompts} Japanese prompts; import -> export hf",
                ESTIMATE_S["parity"])
            parity_due = False
    return rows


def total_seconds(rows: list[dict]) -> float:
    return sum(r["seconds"] or 0 for r in rows)


def device_command(argv: list[str], time_budget: float) -> str:
    """The one command line of a device call (carrying WHEELS): install the wheels to SITE, put it on
    PYTHONPATH, run the benchmark under `timeout` with the budget, its results and log into $OUT."""
    keep, skip_next = [], False
    for arg in argv:  # the run's own arguments, less those the device command sets itself
        if skip_next:
            skip_next = False
        elif arg in ("--dryrun",):
            continue
        elif arg in ("--results", "--work-dir", "--time-budget"):
            skip_next = True
        elif not arg.startswith(("--results=", "--work-dir=", "--time-budget=")):
            keep.append(arg)
    budget = f"{time_budget:.0f}"
    try:  # the device's copy of the tree has no .git: the commit travels in the environment
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=30).stdout.strip()
    except OSError:
        commit = ""
    bench = shlex.join(["python3", "bench/gpu_lora_throughput.py", *keep, "--time-budget", budget])
    return (f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target {SITE} "
            f"{WHEELS}/*.whl && export PYTHONPATH={SITE} || exit; set -o pipefail; "
            + (f"JP_PEFT_COMMIT={commit} " if commit else "")
            + f"PYTHONUNBUFFERED=1 timeout -k {STOP_GRACE_S} {budget} {bench} --results \"$OUT\" 2>&1 "
            f"| tee \"$OUT/gpu_lora_throughput.log\"")


def render(args, argv: list[str]) -> tuple[list[str], bool]:
    """The plan as printed lines, and whether it fits DEVICE_LIMIT_S (always, on CPU)."""
    rows = steps(args)
    work = args.work_dir or "a new one under /tmp"
    lines = [f"mode {'tiny-cpu' if args.tiny else 'gpu'}; work dir {work}; results under {args.results}"]
    if args.tiny:
        lines += [f"{i:>3}. {r['step']}" for i, r in enumerate(rows, 1)]
        return lines, True
    lines.append(f"device run: one command of at most {DEVICE_LIMIT_S} s; budgets in seconds (estimates for one "
                 f"H100/H200, bench/gpu/plan.py)")
    for i, row in enumerate(rows, 1):
        seconds = "-" if row["seconds"] is None else str(row["seconds"])
        note = f" ({row['note']})" if row["note"] else ""
        lines.append(f"{i:>3}. {row['step'] + note:<90} {seconds:>4}")
    total = total_seconds(rows)
    hard_stop = ESTIMATE_S["install"] + args.time_budget + STOP_GRACE_S
    fits = total <= DEVICE_LIMIT_S and hard_stop <= DEVICE_LIMIT_S
    lines.append(f"     {'total (estimated)':<90} {total:>4} of {DEVICE_LIMIT_S}")
    lines.append(f"     {'hard stop: install + --time-budget ' + format(args.time_budget, '.0f') + ' + stop grace':<90} "
                 f"{hard_stop:>4.0f} of {DEVICE_LIMIT_S}")
    if not fits:
        lines.append(f"OVER the device's {DEVICE_LIMIT_S} s: shorten the run (fewer --seq/--micro-batches, --steps, "
                     f"--time-budget <= {DEVICE_TIME_BUDGET_S})")
    lines += [f"device command (carry [\"{WHEELS}\"], filled by `bench/gpu/carry.sh {WHEELS}`; timeout_s 600):",
              device_command(argv, args.time_budget)]
    return lines, fits

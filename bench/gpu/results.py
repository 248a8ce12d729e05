"""The results file: its fields, the throughput statistics of a trial, the ratios and the targets.

Everything here is a pure function of logged rows or of the results dict, so it is tested on known
inputs without a GPU; trials.Bench writes the file.
"""

from __future__ import annotations

import math
import statistics

from bench.gpu import BenchError

TARGETS = {"megatron_tokens_per_s_per_gpu": 120_000, "megatron_seq_length": 2048, "megatron_over_plain": 3.0}
# The documented top-level fields of a results file (tests/bench checks every one is written).
RESULT_FIELDS = ("benchmark", "mode", "complete", "failed_step", "error", "command", "started", "written",
                 "wall_seconds", "machine", "versions", "model", "workload", "configurations", "ratios", "targets",
                 "parity", "steps")
TRIAL_FIELDS = ("config", "seq_length", "micro_batch", "global_batch", "status", "steps", "measured_steps",
                "tokens_per_s", "tflops_per_s", "mfu", "peak_memory_mb", "step_time_s", "wall_seconds", "log")
OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "CUBLAS_STATUS_ALLOC_FAILED", "out of memory")
# The speed-ups reported per sequence length: name -> (numerator, denominator) configuration.
RATIO_PAIRS = {"megatron_over_plain": ("megatron", "plain_hf_peft"),
               "megatron_over_hf_backend": ("megatron", "hf_backend"),
               "hf_backend_over_plain": ("hf_backend", "plain_hf_peft")}


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100), linear between order statistics (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def step_time_spread(seconds) -> dict:
    """Median, p10, p90, min, max of step times, and (p90 - p10) / median: the run-to-run noise."""
    median = percentile(seconds, 50)
    p10, p90 = percentile(seconds, 10), percentile(seconds, 90)
    return {"median": median, "p10": p10, "p90": p90, "min": min(seconds), "max": max(seconds),
            "relative_spread": (p90 - p10) / median if median else None}


def throughput(rows: list[dict], warmup: int, flops_per_token: float, peak: float | None) -> dict:
    """tokens/s (median of the steps after `warmup`), TFLOP/s, MFU, peak memory, step-time spread from
    train_log.jsonl rows (perf/tokens_per_s, perf/step_time_s, perf/peak_memory_mb)."""
    steps = [r for r in rows if "perf/tokens_per_s" in r]
    measured = steps[warmup:]
    if len(measured) < 2:
        raise BenchError(f"{len(steps)} logged steps, fewer than warm-up {warmup} + 2 to measure")
    tokens_per_s = statistics.median(r["perf/tokens_per_s"] for r in measured)
    tflops = tokens_per_s * flops_per_token / 1e12
    memory = [r["perf/peak_memory_mb"] for r in steps if r.get("perf/peak_memory_mb") is not None]
    return {"steps": len(steps), "measured_steps": len(measured), "tokens_per_s": tokens_per_s,
            "tflops_per_s": tflops, "mfu": tflops / peak if peak else None,
            "peak_memory_mb": max(memory) if memory else None,
            "step_time_s": step_time_spread([r["perf/step_time_s"] for r in measured])}


def is_oom(log_text: str) -> bool:
    return any(marker in log_text for marker in OOM_MARKERS)


def ratios(configurations: dict, seq_lengths) -> dict:
    """{seq: {ratio name: best tokens/s of one configuration / another's}} for the pairs both measured."""
    found = {}
    for seq in seq_lengths:
        tps = {c: e["best"][str(seq)]["tokens_per_s"] for c, e in configurations.items() if e["best"].get(str(seq))}
        found[str(seq)] = {name: tps[a] / tps[b] for name, (a, b) in RATIO_PAIRS.items() if a in tps and b in tps}
    return found


def targets(configurations: dict, found_ratios: dict) -> dict:
    """The issue's targets (for an H100), each with what was measured and whether it is met."""
    seq = str(TARGETS["megatron_seq_length"])
    best = configurations.get("megatron", {}).get("best", {}).get(seq)
    measured = best["tokens_per_s"] if best else None
    ratio = found_ratios.get(seq, {}).get("megatron_over_plain")
    return {"megatron_tokens_per_s_per_gpu": {"target": TARGETS["megatron_tokens_per_s_per_gpu"], "measured": measured,
                                              "met": measured >= TARGETS["megatron_tokens_per_s_per_gpu"]
                                              if best else None},
            "megatron_over_plain": {"target": TARGETS["megatron_over_plain"], "measured": ratio,
                                    "met": ratio >= TARGETS["megatron_over_plain"] if ratio else None},
            "seq_length": TARGETS["megatron_seq_length"],
            "note": "targets are for an H100; the peak used for MFU is the device's own"}


def summary_text(result: dict) -> str:
    lines = [f"{'configuration':<15} {'seq':>5} {'micro':>5} {'tokens/s':>12} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}"]
    for config, entry in result["configurations"].items():
        for seq, best in entry["best"].items():
            mfu = f"{best['mfu']:.1%}" if best["mfu"] is not None else "-"
            memory = f"{best['peak_memory_mb'] / 1024:.1f}" if best["peak_memory_mb"] else "-"
            lines.append(f"{config:<15} {seq:>5} {best['micro_batch']:>5} {best['tokens_per_s']:>12,.0f} "
                         f"{best['tflops_per_s']:>8.2f} {mfu:>6} {memory:>8}")
    for seq, found in result["ratios"].items():
        lines.append(f"seq {seq}: " + ", ".join(f"{k} {v:.2f}x" for k, v in found.items()))
    return "\n".join(lines)

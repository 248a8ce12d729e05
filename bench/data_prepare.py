"""Data preparation throughput: `jp-peft data prepare` vs Megatron-LM's tools/preprocess_data.py,
same corpus, same tokenizer, same worker count, in one run. Writes bench/results/data_prepare_*.json.

    apt-get install manpages-ja
    python bench/debian_ja_corpus.py --output /tmp/manpages_ja.jsonl --repeat 2
    python bench/data_prepare.py --input /tmp/manpages_ja.jsonl --megatron-lm /path/to/Megatron-LM --workers 2

--megatron-lm is a Megatron-LM checkout at the tag matching the installed megatron-core
(core_v0.15.x); it is run as it is, read-only, never copied into this repository. Both programs
are timed end to end as subprocesses (interpreter start, imports, reading, tokenising, writing),
alternating, `--repeats` times; the median wall time of each gives documents/s and MB/s.
jp-peft additionally normalises, filters, deduplicates (exact + MinHash) and keeps rejects.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def count_docs(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def run_timed(cmd: list[str], env: dict) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--megatron-lm", required=True, type=Path, help="Megatron-LM checkout (tools/preprocess_data.py)")
    parser.add_argument("--tokenizer", help="HF tokenizer dir (default: the embedded tiny Qwen2's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)

    if not (args.megatron_lm / "tools" / "preprocess_data.py").exists():
        print(f"error: {args.megatron_lm}/tools/preprocess_data.py not found", file=sys.stderr)
        return 2
    tokenizer = args.tokenizer
    if tokenizer is None:
        from jp_peft.tiny import ensure_tiny_base

        tokenizer = str(ensure_tiny_base())
    docs, size = count_docs(args.input), args.input.stat().st_size
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    megatron_env = {**env, "PYTHONPATH": str(args.megatron_lm)}
    commands = {
        "jp_peft": ([sys.executable, "-m", "jp_peft.cli", "data", "prepare", "--input", str(args.input), "--tokenizer",
                     tokenizer, "--output-prefix", str(work / "jp"), "--workers", str(args.workers), "--no-progress"], env),
        "megatron_preprocess_data": ([sys.executable, str(args.megatron_lm / "tools" / "preprocess_data.py"), "--input",
                                      str(args.input), "--output-prefix", str(work / "mlm"), "--tokenizer-type",
                                      "HuggingFaceTokenizer", "--tokenizer-model", tokenizer, "--workers",
                                      str(args.workers), "--append-eod"], megatron_env),
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeats):  # alternate, so both see the same machine state
        for name, (cmd, cmd_env) in commands.items():
            times[name].append(run_timed(cmd, cmd_env))
    report = json.loads((work / "jp.report.json").read_text())
    results = {}
    for name, values in times.items():
        median = statistics.median(values)
        results[name] = {"seconds": values, "median_seconds": median, "docs_per_second": docs / median,
                         "mb_per_second": size / 1e6 / median}
    out = {
        "benchmark": "data_prepare", "input": str(args.input), "documents": docs, "bytes": size,
        "tokenizer": tokenizer, "workers": args.workers, "repeats": args.repeats, "results": results,
        "ratio_jp_peft_over_megatron": results["megatron_preprocess_data"]["median_seconds"] / results["jp_peft"]["median_seconds"],
        "jp_peft_extra_work": {"kept": report["kept"], "rejected": report["rejected"], "near_dedup": True},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "megatron_lm": subprocess.run(["git", "-C", str(args.megatron_lm), "describe", "--tags"], capture_output=True,
                                      text=True).stdout.strip() or str(args.megatron_lm),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"data_prepare_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:26s} {r['median_seconds']:7.2f} s  {r['docs_per_second']:8.1f} docs/s  {r['mb_per_second']:6.2f} MB/s")
    print(f"jp-peft speed / Megatron speed = {out['ratio_jp_peft_over_megatron']:.2f}  -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Data preparation: `jp-peft data prepare` (validation + NFKC + filters + exact/near dedup + tokenisation,
on datatrove's local executor) vs Megatron-LM's tools/preprocess_data.py (tokenisation only), same
corpus, same tokenizer, same worker count, side by side in one run; and the peak memory of the pipeline
at 1x and 4x the distinct documents with the same tasks. Writes bench/results/data_prepare_*.json.

    apt-get install manpages-ja
    python bench/debian_ja_corpus.py --output /tmp/manpages_ja.jsonl --repeat 2
    python bench/data_prepare.py --input /tmp/manpages_ja.jsonl --megatron-lm /path/to/Megatron-LM --workers 2

--megatron-lm is a Megatron-LM checkout at the tag matching the installed megatron-core (core_v0.15.x);
it is run as it is, read-only, never copied into this repository. Both programs are timed end to end as
subprocesses (interpreter start, imports, reading, tokenising, writing), alternating A and B for
`--repeats` rounds, so that both see the same machine (which may be shared: the ratio of each round is
recorded, and their median is the headline). Peak RSS is that of the largest process of the run (the
launcher or any worker: Linux's RUSAGE_CHILDREN maximum over the reaped process tree).

Memory: the corpus's distinct documents (1x) and 4x as many (each extra document the first half of one
document joined to the second half of another: distinct texts, not near-duplicates), both prepared with
`--tasks` tasks and `--workers` workers; the ratio of the peaks and the growth per extra document.
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


# Runs one command and reports its wall time and the peak RSS of its process tree. A fresh helper per
# command: RUSAGE_CHILDREN is the maximum over every child a process ever reaped.
MEASURE = """import json, resource, subprocess, sys, time
cmd = json.loads(sys.argv[1])
started = time.perf_counter()
proc = subprocess.run(cmd, capture_output=True, text=True)
seconds = time.perf_counter() - started
print(json.dumps([seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, proc.returncode,
                  proc.stdout[-2000:] + proc.stderr[-2000:]]))
"""


def measure(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB of the largest process the command started, itself included)."""
    helper = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(cmd)], env=env, capture_output=True, text=True)
    seconds, peak, code, tail = json.loads(helper.stdout.strip().splitlines()[-1])
    if code != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{tail}")
    return seconds, peak


def distinct_corpora(source: Path, out_dir: Path) -> dict[int, Path]:
    """1x: the source's distinct documents; 4x: those and three times as many recombined ones."""
    texts = list(dict.fromkeys(json.loads(line)["text"] for line in open(source, encoding="utf-8") if line.strip()))
    n = len(texts)
    extra = []
    for k in (1, 2, 3):
        stride = k * (n // 4) + 1
        for i, text in enumerate(texts):
            other = texts[(i + stride) % n]
            extra.append(text[:len(text) // 2] + "\n" + other[len(other) // 2:])
    paths = {}
    for scale, docs in ((1, texts), (4, texts + extra)):
        paths[scale] = out_dir / f"distinct_x{scale}.jsonl"
        with open(paths[scale], "w", encoding="utf-8") as handle:
            for text in docs:
                handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return paths


def jp_peft_cmd(inputs: Path, tokenizer: str, prefix: Path, workers: int, tasks: int) -> list[str]:
    return [sys.executable, "-m", "jp_peft.cli", "data", "prepare", "--input", str(inputs), "--tokenizer", tokenizer,
            "--output-prefix", str(prefix), "--workers", str(workers), "--tasks", str(tasks), "--no-progress"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--megatron-lm", required=True, type=Path, help="Megatron-LM checkout (tools/preprocess_data.py)")
    parser.add_argument("--tokenizer", help="HF tokenizer dir (default: the embedded tiny Qwen2's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-repeats", type=int, default=2)
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
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "JP_PEFT_WORK_ROOT": str(work / "work")}
    megatron_env = {**env, "PYTHONPATH": str(args.megatron_lm)}
    commands = {
        "jp_peft": (jp_peft_cmd(args.input, tokenizer, work / "jp", args.workers, args.workers), env),
        "megatron_preprocess_data": ([sys.executable, str(args.megatron_lm / "tools" / "preprocess_data.py"), "--input",
                                      str(args.input), "--output-prefix", str(work / "mlm"), "--tokenizer-type",
                                      "HuggingFaceTokenizer", "--tokenizer-model", tokenizer, "--workers",
                                      str(args.workers), "--append-eod"], megatron_env),
    }
    load_before = os.getloadavg()
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(args.repeats):  # alternate, so both see the same machine state
        for name, (cmd, cmd_env) in commands.items():
            runs[name].append(measure(cmd, cmd_env))
    report = json.loads((work / "jp.report.json").read_text())
    results = {}
    for name, values in runs.items():
        seconds = [s for s, _ in values]
        median = statistics.median(seconds)
        results[name] = {"seconds": seconds, "median_seconds": median, "docs_per_second": docs / median,
                         "mb_per_second": size / 1e6 / median, "peak_rss_mb": max(m for _, m in values)}
    per_round = [m / j for (j, _), (m, _) in zip(runs["jp_peft"], runs["megatron_preprocess_data"])]

    corpora = distinct_corpora(args.input, work)
    memory = {1: [], 4: []}
    for _ in range(args.memory_repeats):
        for scale, path in corpora.items():
            memory[scale].append(measure(jp_peft_cmd(path, tokenizer, work / f"x{scale}", args.workers, args.workers),
                                         env))
    kept = {scale: json.loads((work / f"x{scale}.report.json").read_text())["kept"] for scale in corpora}
    peaks = {scale: max(m for _, m in values) for scale, values in memory.items()}
    n1 = count_docs(corpora[1])
    out = {
        "benchmark": "data_prepare", "input": str(args.input), "documents": docs, "bytes": size,
        "tokenizer": tokenizer, "workers": args.workers, "tasks": args.workers, "repeats": args.repeats,
        "results": results,
        "ratio_jp_peft_over_megatron": statistics.median(per_round),
        "ratio_per_round": per_round,
        "jp_peft_extra_work": {"kept": report["kept"], "rejected": report["rejected"], "near_dedup": True},
        "jp_peft_time": {"report_seconds": report["seconds"], "task_seconds": report["task_seconds"],
                         "startup_and_exit_seconds": results["jp_peft"]["seconds"][-1] - report["seconds"]},
        "memory": {"tasks": args.workers, "workers": args.workers,
                   "x1": {"documents": n1, "bytes": corpora[1].stat().st_size, "kept": kept[1], "peak_rss_mb": peaks[1],
                          "runs": memory[1]},
                   "x4": {"documents": count_docs(corpora[4]), "bytes": corpora[4].stat().st_size, "kept": kept[4],
                          "peak_rss_mb": peaks[4], "runs": memory[4]},
                   "ratio_x4_over_x1": peaks[4] / peaks[1],
                   "growth_bytes_per_extra_document": (peaks[4] - peaks[1]) * 2**20 / (kept[4] - kept[1])},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "megatron_lm": subprocess.run(["git", "-C", str(args.megatron_lm), "describe", "--tags"], capture_output=True,
                                      text=True).stdout.strip() or str(args.megatron_lm),
        "datatrove": _version("datatrove"),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"data_prepare_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:26s} {r['median_seconds']:7.2f} s  {r['docs_per_second']:8.1f} docs/s  {r['mb_per_second']:6.2f} "
              f"MB/s  peak {r['peak_rss_mb']:.0f} MB")
    print(f"jp-peft speed / Megatron speed = {out['ratio_jp_peft_over_megatron']:.2f} "
          f"(rounds: {', '.join(f'{x:.2f}' for x in per_round)})")
    print(f"peak RSS 1x {peaks[1]:.0f} MB, 4x {peaks[4]:.0f} MB: {out['memory']['ratio_x4_over_x1']:.3f}x -> {path}")
    return 0


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    sys.exit(main())

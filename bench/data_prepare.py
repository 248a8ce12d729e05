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

Megatron runs as shipped: at core_v0.15.x its default tokenizer path (megatron.core.tokenizers'
HuggingFaceTokenizer) turns each document into token strings and then ids in Python; `--legacy-tokenizer`
(one `tokenizer(text).input_ids` call) is probed once and joins the rounds only if it runs (at core_v0.15.3
it fails: its Encoder never stores the legacy tokenizer). To separate "tokenises less" from "tokenises
faster", a third contender is Megatron on only the documents jp-peft keeps (the input lines that are not in
jp-peft's rejects, before NFKC): the same tokenisation work as jp-peft's, with none of its other work.

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
MEASURE = """import json, os, resource, signal, subprocess, sys, time
cmd, timeout = json.loads(sys.argv[1]), json.loads(sys.argv[2])
started = time.perf_counter()
proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
try:
    out, err = proc.communicate(timeout=timeout)
except subprocess.TimeoutExpired:  # the whole process group: a hung pool's workers hold the pipes too
    os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    err += f"\\ntimed out after {timeout} s"
seconds = time.perf_counter() - started
print(json.dumps([seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, proc.returncode,
                  out[-2000:] + err[-2000:]]))
"""


def measure(cmd: list[str], env: dict, timeout: float | None = None, output: Path | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB of the largest process the command started, itself included). A run that
    exits non-zero, or exits 0 without writing `output` (Megatron's launcher does not check its worker
    processes' exit codes), raises RuntimeError with the end of its output."""
    helper = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(cmd), json.dumps(timeout)], env=env,
                            capture_output=True, text=True)
    seconds, peak, code, tail = json.loads(helper.stdout.strip().splitlines()[-1])
    if code != 0 or (output is not None and not output.exists()):
        missing = "" if code != 0 else f"exit status 0 but no {output.name}"
        raise RuntimeError(f"{cmd[:4]} failed:\n{tail}\n{missing}")
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


def kept_lines(source: Path, rejected: Path, out: Path) -> int:
    """The input lines jp-peft kept (every line not in its rejects), written to `out`; their count."""
    dropped = {json.loads(line)["line"] for line in open(rejected, encoding="utf-8") if line.strip()}
    kept = 0
    with open(source, "rb") as src, open(out, "wb") as dst:
        for number, line in enumerate(src, start=1):
            if number not in dropped and line.strip():
                dst.write(line)
                kept += 1
    return kept


def megatron_cmd(megatron_lm: Path, inputs: Path, tokenizer: str, prefix: Path, workers: int,
                 legacy: bool = False) -> list[str]:
    return [sys.executable, str(megatron_lm / "tools" / "preprocess_data.py"), "--input", str(inputs),
            "--output-prefix", str(prefix), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
            "--workers", str(workers), "--append-eod", *(["--legacy-tokenizer"] if legacy else [])]


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
    jp_cmd = jp_peft_cmd(args.input, tokenizer, work / "jp", args.workers, args.workers)
    # An untimed jp-peft run first: its rejects name the kept lines (and both programs then find the input
    # in the page cache).
    first_seconds, _ = measure(jp_cmd, env)
    kept_input = work / "kept_lines.jsonl"
    kept_docs = kept_lines(args.input, work / "jp.rejected.jsonl", kept_input)
    commands = {
        "jp_peft": (jp_cmd, env),
        "megatron_preprocess_data": (megatron_cmd(args.megatron_lm, args.input, tokenizer, work / "mlm", args.workers),
                                     megatron_env),
    }
    legacy = megatron_cmd(args.megatron_lm, args.input, tokenizer, work / "mlm_legacy", args.workers, legacy=True)
    try:  # at core_v0.15.3 it fails, or hangs (its pool's workers die): time-limited
        measure(legacy, megatron_env, timeout=max(120.0, 4 * first_seconds),
                output=work / "mlm_legacy_text_document.idx")
        legacy_status = "ran (timed in the rounds)"
        commands["megatron_legacy_tokenizer"] = (legacy, megatron_env)
    except RuntimeError as error:
        lines = [x.strip() for x in str(error).splitlines() if x.strip()]
        named = [x for x in lines if "Error" in x or x.startswith(("timed out", "exit status"))]
        legacy_status = f"failed: {'; '.join(named[-2:]) or (lines or ['no output'])[-1]}"
    commands["megatron_kept_documents_only"] = (
        megatron_cmd(args.megatron_lm, kept_input, tokenizer, work / "mlm_kept", args.workers), megatron_env)
    # Fixed costs (interpreter, imports, pool start-up, exit): each program on the corpus's first kept document.
    one_doc = work / "one_document.jsonl"
    with open(kept_input, "rb") as src:
        one_doc.write_bytes(src.readline())
    commands["jp_peft_one_document"] = (jp_peft_cmd(one_doc, tokenizer, work / "jp_one", args.workers, args.workers),
                                        env)
    commands["megatron_one_document"] = (megatron_cmd(args.megatron_lm, one_doc, tokenizer, work / "mlm_one",
                                                      args.workers), megatron_env)
    load_before = os.getloadavg()
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(args.repeats):  # alternate, so all see the same machine state
        for name, (cmd, cmd_env) in commands.items():
            prefix = Path(cmd[cmd.index("--output-prefix") + 1])
            output = prefix.parent / (prefix.name + ("_text_document.idx" if "preprocess_data.py" in cmd[1] else
                                                     ".report.json"))
            output.unlink(missing_ok=True)
            runs[name].append(measure(cmd, cmd_env, output=output))
    report = json.loads((work / "jp.report.json").read_text())
    results = {}
    for name, values in runs.items():
        seconds = [s for s, _ in values]
        median = statistics.median(seconds)
        n, size_of = {"megatron_kept_documents_only": (kept_docs, kept_input.stat().st_size),
                      "jp_peft_one_document": (1, one_doc.stat().st_size),
                      "megatron_one_document": (1, one_doc.stat().st_size)}.get(name, (docs, size))
        results[name] = {"seconds": seconds, "median_seconds": median, "documents": n, "bytes": size_of,
                         "docs_per_second": n / median, "mb_per_second": size_of / 1e6 / median,
                         "peak_rss_mb": max(m for _, m in values)}

    def round_ratios(other: str) -> list[float]:  # jp-peft speed / other's speed on the whole corpus, per round
        return [o / j for (j, _), (o, _) in zip(runs["jp_peft"], runs[other])]

    per_round = round_ratios("megatron_preprocess_data")
    # Without the fixed costs (each program's one-document run of the same round subtracted): the ratio a
    # corpus large enough to make start-up negligible would approach.
    marginal = [(m - m1) / (j - j1) for (j, _), (m, _), (j1, _), (m1, _) in
                zip(runs["jp_peft"], runs["megatron_preprocess_data"], runs["jp_peft_one_document"],
                    runs["megatron_one_document"])]

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
        "ratio_without_fixed_costs": statistics.median(marginal),
        "ratio_without_fixed_costs_per_round": marginal,
        "megatron_legacy_tokenizer": legacy_status,
        # Wall time of Megatron tokenising only the documents jp-peft keeps / jp-peft's wall time for the whole
        # pipeline on the whole corpus (> 1: jp-peft's whole run takes less time than that tokenisation alone).
        "ratio_jp_peft_over_megatron_kept_only": statistics.median(round_ratios("megatron_kept_documents_only")),
        "ratio_jp_peft_over_megatron_kept_only_per_round": round_ratios("megatron_kept_documents_only"),
        **({"ratio_jp_peft_over_megatron_legacy_tokenizer":
            statistics.median(round_ratios("megatron_legacy_tokenizer"))} if "megatron_legacy_tokenizer" in runs else {}),
        "tokens": {"jp_peft": report["tokens"], "megatron_preprocess_data": megatron_tokens(work / "mlm_text_document.idx"),
                   "megatron_kept_documents_only": megatron_tokens(work / "mlm_kept_text_document.idx")},
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
          f"(rounds: {', '.join(f'{x:.2f}' for x in per_round)}); Megatron on the kept documents only / jp-peft "
          f"wall = {out['ratio_jp_peft_over_megatron_kept_only']:.2f}; without fixed costs "
          f"{out['ratio_without_fixed_costs']:.2f}; legacy tokenizer: {legacy_status}")
    print(f"peak RSS 1x {peaks[1]:.0f} MB, 4x {peaks[4]:.0f} MB: {out['memory']['ratio_x4_over_x1']:.3f}x -> {path}")
    return 0


def megatron_tokens(idx: Path) -> int:
    """Tokens in a Megatron .idx (EOD included): the sum of its int32 sequence lengths."""
    import numpy as np

    with open(idx, "rb") as handle:
        header = handle.read(9 + 8 + 1 + 8 + 8)  # magic, version, dtype code, sequences, documents
    sequences = int.from_bytes(header[18:26], "little")
    return int(np.fromfile(idx, dtype=np.int32, count=sequences, offset=34).sum())


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    sys.exit(main())

"""Write BENCHMARKS.md from the results files in bench/results/ (no number is typed by hand).

    python bench/report.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def latest(prefix: str) -> tuple[Path, dict] | None:
    files = sorted(RESULTS.glob(f"{prefix}_*.json"))
    return (files[-1], json.loads(files[-1].read_text())) if files else None


def data_section() -> list[str]:
    found = latest("data_prepare")
    if not found:
        return ["_No results yet: run bench/data_prepare.py._"]
    path, r = found
    m = r["machine"]
    load = (f" (load average {m['load_average_before'][0]:.1f} before, {m['load_average_after'][0]:.1f} after)"
            if "load_average_before" in m else "")
    lines = [f"Corpus: {r['input']} ({r['documents']:,} documents, {r['bytes'] / 1e6:.1f} MB; Debian manpages-ja "
             f"extracted by bench/debian_ja_corpus.py), tokenizer {Path(r['tokenizer']).name}, {r['workers']} workers "
             f"(jp-peft: {r.get('tasks', r['workers'])} tasks on datatrove {r.get('datatrove', '?')}'s local executor), "
             f"{r['repeats']} rounds alternating the two, each end to end as a subprocess (start-up and imports "
             f"included), on {m['cpus']} CPUs{load}. Megatron-LM: {r['megatron_lm']}.", "",
             "| pipeline | median wall s | docs/s | MB/s | peak RSS of any process |", "|---|---|---|---|---|"]
    for name, v in r["results"].items():
        rss = f"{v['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in v else "-"
        lines.append(f"| {name} | {v['median_seconds']:.2f} | {v['docs_per_second']:.1f} | {v['mb_per_second']:.2f} "
                     f"| {rss} |")
    rejected = ", ".join(f"{k} {v}" for k, v in r["jp_peft_extra_work"]["rejected"].items() if v)
    rounds = r.get("ratio_per_round")
    per_round = f" (median of the rounds: {', '.join(f'{x:.2f}' for x in rounds)})" if rounds else ""
    lines += ["", f"jp-peft throughput / Megatron throughput: **{r['ratio_jp_peft_over_megatron']:.2f}x**{per_round}, "
              f"while also validating, NFKC-normalising, filtering and deduplicating across shards (kept "
              f"{r['jp_peft_extra_work']['kept']:,}; rejected: {rejected}). Megatron tokenises every document; "
              "jp-peft tokenises only those it keeps, in batches, in the Rust tokenizer."]
    if "jp_peft_time" in r:
        t = r["jp_peft_time"]
        stages = t["task_seconds"]["stages"]
        steps = t["task_seconds"]["steps"]
        order = [s for s in ("count", "clean", "buckets", "clusters", "tokenize", "merge") if s in stages]
        lines += ["", "Where jp-peft's time goes (last round; task-seconds summed over the tasks of each stage, "
                  f"which run {r['workers']} at a time): " + ", ".join(f"{s} {stages[s]:.2f} s" for s in order)
                  + f"; within clean, validation + NFKC + filters {steps.get('clean.clean_and_filter', 0):.2f} s and "
                  f"MinHash signatures {steps.get('clean.minhash', 0):.2f} s; within tokenize, the Rust tokenizer "
                  f"{steps.get('tokenize.tokenize', 0):.2f} s. Interpreter start-up, imports and exit: "
                  f"{t['startup_and_exit_seconds']:.2f} s of the {r['results']['jp_peft']['seconds'][-1]:.2f} s."]
    if "memory" in r:
        mem = r["memory"]
        lines += ["", f"Memory, {mem['tasks']} tasks: peak RSS of any process at 1x ({mem['x1']['documents']:,} distinct "
                  f"documents, {mem['x1']['bytes'] / 1e6:.1f} MB) **{mem['x1']['peak_rss_mb']:.0f} MB**, at 4x "
                  f"({mem['x4']['documents']:,} documents, {mem['x4']['bytes'] / 1e6:.1f} MB) "
                  f"**{mem['x4']['peak_rss_mb']:.0f} MB**: **{mem['ratio_x4_over_x1']:.3f}x** (bound: 1.3x), "
                  f"{mem['growth_bytes_per_extra_document']:.0f} bytes per extra kept document (the in-memory "
                  "MinHash index the pipeline replaced grew by about 3,400)."]
    lines += ["", f"Source: `{path.relative_to(REPO)}`."]
    return lines


def cpu_section() -> list[str]:
    found = latest("cpu_train_throughput")
    if not found:
        return ["_No results yet: run bench/cpu_train_throughput.py._"]
    path, r = found
    m = r["median_tokens_per_s"]
    lines = [f"Model: {r['model']}; LoRA rank {r['lora']['rank']} on {len(r['lora']['targets'])} projections; "
             f"seq {r['seq_length']}, global batch {r['global_batch']} (micro {r['micro_batch']}); {r['steps']} steps, "
             f"median after {r['warmup']} warm-up steps, {r['rounds']} alternating rounds, one process; "
             f"{r['machine']['cpus']} CPUs, torch {r['machine']['torch']}.", "",
             "| configuration | tokens/s |", "|---|---|"]
    for name, value in m.items():
        lines.append(f"| {name} | {value:.1f} |")
    ratio = r["ratio_jp_peft_over_plain"]
    verdict = "meets" if ratio >= 1.0 else "falls short of"
    per_round = r.get("ratio_jp_peft_over_plain_per_round")
    spread = (f" (per round, back to back: {', '.join(f'{x:.3f}' for x in per_round)})" if per_round else "")
    lines += ["", f"hf backend / plain transformers+peft loop: **{ratio:.3f}**{spread}, which {verdict} the >= 1.0 "
              f"goal (no framework tax). Packed / padded SFT effective tokens/s: "
              f"**{r['ratio_packed_over_padded_effective_tokens']:.2f}x**. Source: `{path.relative_to(REPO)}`."]
    return lines


def smoke_section() -> list[str]:
    found = latest("smoke_wall_time")
    if not found:
        return ["_No results yet: run bench/smoke_wall_time.py._"]
    path, r = found
    return [f"`{r['command']}` from an empty cache (tiny base built): **{r['wall_seconds']:.0f} s** on "
            f"{r['machine']['cpus']} CPUs; CPT Japanese ppl {r['cpt_ja_ppl_before']:.1f} -> {r['cpt_ja_ppl_after']:.1f}. "
            f"Source: `{path.relative_to(REPO)}`."]


def main() -> int:
    text = ["# Benchmarks", "",
            "Every number below is read from a results file in `bench/results/` by `bench/report.py`; regenerate "
            "this file with `python bench/report.py` after running a benchmark.", "",
            "These CPU benchmarks ran on a 2-core machine that other work (test runs) shared at the same time. "
            "The headline figures are therefore ratios measured side by side in one run (A and B alternated, "
            "several rounds), which such load affects alike; absolute times and rates are only indicative.", "",
            "## GPU (H100 class): not measured", "",
            "No CUDA machine was available to the session that wrote these benchmarks, so the GPU rows "
            "(`bench/gpu_lora_throughput.py`: Megatron backend vs hf backend vs plain HF+PEFT, tokens/s/GPU, MFU, "
            "memory; NeMo-vs-HF parity) are empty rather than estimated.", "",
            "## Data preparation (CPU)", "", *data_section(), "",
            "## Training throughput on CPU", "", *cpu_section(), "",
            "## End-to-end smoke run", "", *smoke_section(), ""]
    (REPO / "BENCHMARKS.md").write_text("\n".join(text))
    print(f"wrote {REPO / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
    lines = [f"Corpus: {r['input']} ({r['documents']:,} documents, {r['bytes'] / 1e6:.1f} MB; Debian manpages-ja "
             f"extracted by bench/debian_ja_corpus.py), tokenizer {Path(r['tokenizer']).name}, {r['workers']} workers, "
             f"median of {r['repeats']} alternating end-to-end runs on {r['machine']['cpus']} CPUs. Megatron-LM: "
             f"{r['megatron_lm']}.", "",
             "| pipeline | wall s | docs/s | MB/s |", "|---|---|---|---|"]
    for name, v in r["results"].items():
        lines.append(f"| {name} | {v['median_seconds']:.2f} | {v['docs_per_second']:.1f} | {v['mb_per_second']:.2f} |")
    rejected = ", ".join(f"{k} {v}" for k, v in r["jp_peft_extra_work"]["rejected"].items() if v)
    lines += ["", f"jp-peft throughput / Megatron throughput: **{r['ratio_jp_peft_over_megatron']:.2f}x**, while also "
              f"validating, NFKC-normalising, filtering and deduplicating (kept {r['jp_peft_extra_work']['kept']:,}; "
              f"rejected: {rejected}). Source: `{path.relative_to(REPO)}`."]
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

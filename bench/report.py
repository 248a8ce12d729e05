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


def failed_runs(results: dict) -> list[str]:
    """A line per backend whose run failed (the results file keeps its log's tail): both benchmarks' sections."""
    lines = []
    for backend, reason in results.get("failed", {}).items():
        lines += ["", f"**{backend}: the run failed** (the results file holds its log's tail): "
                  f"`{reason.strip().splitlines()[-1][:300]}`"]
    return lines


def data_section() -> list[str]:
    found = latest("data_prepare")
    if not found:
        return ["_No results yet: run bench/data_prepare.py._"]
    path, r = found
    m = r["machine"]
    load = (f" (load average {m['load_average_before'][0]:.1f} before, {m['load_average_after'][0]:.1f} after)"
            if "load_average_before" in m else "")
    tiny = (" (the embedded tiny Qwen2's byte-level BPE, with Qwen2's pre-tokenizer; Qwen2.5's own tokenizer was not "
            "available offline)" if Path(r["tokenizer"]).name.startswith("tiny-qwen2") else "")
    lines = [f"Corpus: {r['input']} ({r['documents']:,} documents, {r['bytes'] / 1e6:.1f} MB; Debian manpages-ja "
             f"extracted by bench/debian_ja_corpus.py), tokenizer {Path(r['tokenizer']).name}{tiny}, {r['workers']} workers "
             f"(jp-peft: {r.get('tasks', r['workers'])} tasks on datatrove {r.get('datatrove', '?')}'s local executor), "
             f"{r['repeats']} rounds alternating the {len(r['results'])} configurations, each end to end as a subprocess "
             f"(start-up and imports "
             f"included), on {m['cpus']} CPUs{load}. Megatron-LM: {r['megatron_lm']}.", "",
             "| pipeline | input documents | median wall s | docs/s | MB/s | peak RSS of any process |",
             "|---|---|---|---|---|---|"]
    for name, v in r["results"].items():
        rss = f"{v['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in v else "-"
        rate = (f"{v['docs_per_second']:.1f} | {v['mb_per_second']:.2f}" if v.get("documents", r["documents"]) > 1
                else "- | -")  # a one-document run measures fixed costs only
        lines.append(f"| {name} | {v.get('documents', r['documents']):,} | {v['median_seconds']:.2f} | {rate} | {rss} |")
    rejected = ", ".join(f"{k} {v}" for k, v in r["jp_peft_extra_work"]["rejected"].items() if v)
    rounds = r.get("ratio_per_round")
    per_round = f" (median of the rounds: {', '.join(f'{x:.2f}' for x in rounds)})" if rounds else ""
    lines += ["", f"jp-peft throughput / Megatron throughput: **{r['ratio_jp_peft_over_megatron']:.2f}x**{per_round}, "
              f"while also validating, NFKC-normalising, filtering and deduplicating across shards (kept "
              f"{r['jp_peft_extra_work']['kept']:,}; rejected: {rejected}). Megatron tokenises every document; "
              "jp-peft tokenises only those it keeps, in batches, in the Rust tokenizer."]
    if "ratio_without_fixed_costs" in r:
        res, tokens = r["results"], r["tokens"]
        lines += ["", "Where the ratio comes from, measured in the same rounds: (1) fixed costs: on one document "
                  f"Megatron takes {res['megatron_one_document']['median_seconds']:.1f} s (interpreter, importing "
                  f"megatron.core and torch, its pool), jp-peft {res['jp_peft_one_document']['median_seconds']:.1f} s; "
                  "with each program's one-document time of the same round subtracted, the ratio is "
                  f"**{r['ratio_without_fixed_costs']:.2f}x** (rounds: "
                  f"{', '.join(f'{x:.2f}' for x in r['ratio_without_fixed_costs_per_round'])}), which is what a corpus "
                  "large enough to make start-up negligible approaches; (2) less tokenisation: jp-peft writes "
                  f"{tokens['jp_peft']:,} tokens, Megatron {tokens['megatron_preprocess_data']:,} "
                  f"({tokens['jp_peft'] / tokens['megatron_preprocess_data']:.0%}); Megatron tokenising only the "
                  f"{res['megatron_kept_documents_only']['documents']:,} documents jp-peft keeps "
                  f"({tokens['megatron_kept_documents_only']:,} tokens) takes "
                  f"{r['ratio_jp_peft_over_megatron_kept_only']:.2f}x jp-peft's wall time for the whole pipeline; "
                  "(3) Megatron's tokenizer path: at this tag its default (megatron.core.tokenizers) turns each "
                  "document into token strings and then ids in Python; its `--legacy-tokenizer` "
                  f"(one `tokenizer(text).input_ids` call per document) {r['megatron_legacy_tokenizer']}."]
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
    lines += failed_runs(r)
    lines += ["", f"Source: `{path.relative_to(REPO)}`."]
    return lines


def cpu_section() -> list[str]:
    found = latest("cpu_train_throughput")
    if not found:
        return ["_No results yet: run bench/cpu_train_throughput.py._"]
    path, r = found
    m = r["median_tokens_per_s"]
    machine = r["machine"]
    threads = f"{machine['torch_threads']} torch thread{'s' if machine['torch_threads'] != 1 else ''}"
    if machine["torch_threads"] < machine["cpus"]:
        threads += (" (--threads: other torch jobs shared the cores, where threads that wait for each other at every "
                    "operator stall)")
    load = (f", load average {machine['load_average_before'][0]:.1f} before and {machine['load_average_after'][0]:.1f} "
            "after" if "load_average_before" in machine else "")
    lines = [f"Model: {r['model']}; LoRA rank {r['lora']['rank']} on {len(r['lora']['targets'])} projections; "
             f"seq {r['seq_length']}, global batch {r['global_batch']} (micro {r['micro_batch']}); {r['steps']} steps, "
             f"median after {r['warmup']} warm-up steps, {r['rounds']} alternating rounds, one process; "
             f"{r['machine']['cpus']} CPUs, torch {r['machine']['torch']}, {threads}{load}.", "",
             "| configuration | tokens/s |", "|---|---|"]
    for name, value in m.items():
        lines.append(f"| {name} | {value:.1f} |")
    ratio = r["ratio_jp_peft_over_plain"]
    verdict = "meets" if ratio >= 1.0 else "falls short of"
    per_round = r.get("ratio_jp_peft_over_plain_per_round")
    spread = (f" (per round, back to back: {', '.join(f'{x:.3f}' for x in per_round)})" if per_round else "")
    packed_rounds = r.get("ratio_packed_over_padded_per_round")
    packed_spread = f" (per round: {', '.join(f'{x:.2f}' for x in packed_rounds)})" if packed_rounds else ""
    density = r.get("sft_packing_density")
    expected = (f"; packing puts {density['packed']['real_tokens_per_row']:.1f} real tokens in a {r['seq_length']}-token "
                f"row against {density['padded']['real_tokens_per_row']:.1f} for one example per row on the bundled "
                f"SFT data, so equal step times give **{density['ratio_packed_over_padded']:.2f}x**" if density else "")
    lines += ["", f"hf backend / plain transformers+peft loop: **{ratio:.3f}**{spread}, which {verdict} the >= 1.0 "
              f"goal (no framework tax). Packed / padded SFT effective tokens/s: "
              f"**{r['ratio_packed_over_padded_effective_tokens']:.2f}x**{packed_spread}{expected}. "
              f"Source: `{path.relative_to(REPO)}`."]
    return lines


def smoke_section() -> list[str]:
    found = latest("smoke_wall_time")
    if not found:
        return ["_No results yet: run bench/smoke_wall_time.py._"]
    path, r = found
    m = r["machine"]
    threads = f", OMP_NUM_THREADS={m['omp_num_threads']}" if m.get("omp_num_threads") else ""
    load = (f", load average {m['load_average_before'][0]:.1f} before and {m['load_average_after'][0]:.1f} after (other "
            "jobs shared the machine: only indicative)" if "load_average_before" in m else "")
    return [f"`{r['command']}` from an empty cache (tiny base built): **{r['wall_seconds']:.0f} s** on "
            f"{m['cpus']} CPUs{threads}{load}; CPT Japanese ppl {r['cpt_ja_ppl_before']:.1f} -> "
            f"{r['cpt_ja_ppl_after']:.1f}. Source: `{path.relative_to(REPO)}`."]


def _mb(value) -> str:
    return "-" if value is None else f"{value / 1e6:,.0f} MB"


def real_shape_section() -> list[str]:
    found = latest("real_shape_cpu")
    if not found:
        return ["_No results yet: run bench/real_shape_cpu.py._"]
    path, r = found
    m, b = r["machine"], r["base"]
    load = (f", load average {m['load_average_before'][0]:.1f} before and {m['load_average_after'][0]:.1f} after"
            if "load_average_after" in m else "")
    lines = [f"Qwen2.5-0.5B's architecture with random weights and Qwen2.5's tokenizer (`python -m "
             f"jp_peft.models.real_shape`: {b['params']:,} parameters, {_mb(b['bytes'])} on disk, fp32), through "
             f"import -> data -> cpt -> export -> sft -> export -> eval on each backend, one after the other: the smoke "
             f"preset with `model.name=DIR model.tiny=false`, {r['max_steps']} steps a stage, "
             f"`{' '.join(r['overrides'])}`; {m['cpus']} CPUs{load} (other test runs shared the machine: wall times "
             f"and s/step only indicative). Peak RSS: {r['rss_method']}, the stage's launcher (NeMo-Run) not counted; "
             "the tree's sum counts pages that processes share (a forked worker, a memory-mapped checkpoint) once per "
             "process, so it bounds the stage's memory from above and the largest process from below.", "",
             "| backend | stage | wall s | peak RSS (tree) | largest process | s/step (median, steps 2..) |",
             "|---|---|---|---|---|---|"]
    for backend, rec in r["backends"].items():
        for task, secs in rec["stage_seconds"].items():
            peak = rec["peak_rss"].get(task, {})
            stage = rec["stages"].get(task)
            step = _num(stage["steps"]["median_s_per_step_after_first"], ".2f") if stage else ""
            lines.append(f"| {backend} | {task} | {secs:.0f} | {_mb(peak.get('tree_rss_bytes'))} | "
                         f"{_mb(peak.get('largest_process_rss_bytes'))} | {step} |")
    lines += ["", "| backend | stage | checkpoints/ | hf_adapter | hf_merged | model.nemo | hf_merged: tie_word_embeddings, "
              "lm_head stored, stored parameters | PEFT reload vs hf_merged (max abs logit diff) |",
              "|---|---|---|---|---|---|---|---|"]
    for backend, rec in r["backends"].items():
        for stage, st in rec["stages"].items():
            by, hm, rl = st["bytes"], st["hf_merged"], st.get("peft_reload", {})
            head = ("yes" + (", equal to embed_tokens" if hm["lm_head_equals_embed_tokens"] else ", differs from embed_tokens")
                    if hm["lm_head_stored"] else "no")
            reload = (f"{rl['max_abs_diff']:.2e} (top-1 agreement {rl['argmax_agreement']:.3f}, {rl['positions']} "
                      "positions)" if "max_abs_diff" in rl else "failed")
            lines.append(f"| {backend} | {stage} | {_mb(by['checkpoints'])} | {_mb(by['hf_adapter'])} | "
                         f"{_mb(by['hf_merged'])} | {_mb(by['model.nemo'])} | {hm['tie_word_embeddings']}, {head}, "
                         f"{hm['stored_parameters']:,} | {reload} |")
    lines += ["", "Parity at the real shape (each export.json's checks, and the Megatron import's):", "",
              "| backend | stage | check | max abs logit diff | tolerance |", "|---|---|---|---|---|"]
    for backend, rec in r["backends"].items():
        for check in rec["import"].get("parity", []):
            lines.append(f"| {backend} | import | {check['check']} | {check['max_abs_diff']:.2e} | {check['atol']:.0e} |")
        for stage, st in rec["stages"].items():
            for check in st["parity"]:
                lines.append(f"| {backend} | {stage} | {check['check']} | {check['max_abs_diff']:.2e} | "
                             f"{check['atol']:.0e} |")
        if rec["import"].get("bytes_nemo_checkpoint"):
            lines += ["", f"{backend}: the imported NeMo checkpoint takes {_mb(rec['import']['bytes_nemo_checkpoint'])}."]
    lines += failed_runs(r)
    missing = [b for b in ("hf", "megatron") if b not in r["backends"] and b not in r.get("failed", {})]
    if missing:  # a file of one backend says so, rather than reading as both
        lines += ["", f"**Not measured in this file: {', '.join(missing)}** (run `python bench/real_shape_cpu.py`)."]
    lines += ["", f"Source: `{path.relative_to(REPO)}`."]
    return lines


GPU_NAMES = {"megatron": "jp-peft Megatron backend", "hf_backend": "jp-peft hf backend",
             "plain_hf_peft": "plain transformers + peft"}


def latest_gpu() -> tuple[Path, dict] | None:
    """The newest results of bench/gpu_lora_throughput.py run on a GPU (tiny/CPU runs are never rendered)."""
    files = [f for f in sorted(RESULTS.glob("gpu_lora_throughput_gpu_*.json"))
             if json.loads(f.read_text()).get("mode") == "gpu"]
    return (files[-1], json.loads(files[-1].read_text())) if files else None


def _source(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _num(value, fmt: str, empty: str = "-") -> str:
    return empty if value is None else format(value, fmt)


def gpu_section(found: tuple[Path, dict] | None) -> list[str]:
    """Header, one table per sequence length (best micro batch of each configuration), the sweep, the
    ratios and targets, and the parity checks of one results file."""
    if not found:
        return ["## GPU (H100 class): not measured", "",
                "No CUDA machine was available to the sessions that wrote these benchmarks, so the GPU rows "
                "(`bench/gpu_lora_throughput.py`: Megatron backend vs hf backend vs plain HF+PEFT, tokens/s/GPU, MFU, "
                "memory; NeMo-vs-HF parity) are empty rather than estimated. Run `python bench/gpu_lora_throughput.py` "
                "on one H100/H200, then `python bench/report.py`."]
    path, r = found
    m, v, w, model = r["machine"], r["versions"], r["workload"], r["model"]
    te = v.get("transformer_engine") or "not installed"
    lora = w["lora"]
    lines = [f"## GPU: {m.get('gpu', '?')}", "",
             f"{m.get('gpu', '?')} ({m.get('gpu_memory', '?')}, driver {m.get('driver', '?')}); torch {v.get('torch')}, "
             f"NeMo {v.get('nemo_toolkit')}, megatron-core {v.get('megatron-core')}, Transformer Engine {te}, "
             f"transformers {v.get('transformers')}, peft {v.get('peft')}. Model: {model.get('source')}, "
             f"{model.get('parameters', 0):,} parameters. LoRA rank {lora['rank']} on {len(lora['targets'])} "
             f"projections, {w['precision']}, global batch {w['global_batch']} sequences; tokens/s/GPU is the median "
             f"of the steps after {w['warmup']} warm-up steps ({w['steps']} steps per sweep trial); MFU against "
             f"{_num(w.get('peak_tflops'), '.0f')} TFLOP/s dense bf16. Command: `{r['command']}`."]
    if not r.get("complete"):
        lines += ["", f"**This run did not finish**: it stopped at step `{r.get('failed_step')}` "
                  f"({(r.get('error') or '').splitlines()[0][:300]}). The rows below are what it measured before."]
    for seq in w["seq_lengths"]:
        lines += ["", f"### Sequence length {seq}", "",
                  "| configuration | best micro batch | tokens/s/GPU | TFLOP/s | MFU | peak memory GiB | "
                  "step time s, median (p10-p90) |", "|---|---|---|---|---|---|---|"]
        for config, entry in r["configurations"].items():
            best = entry["best"].get(str(seq))
            if not best:
                lines.append(f"| {GPU_NAMES.get(config, config)} | - | not measured | | | | |")
                continue
            t = best["step_time_s"]
            memory = best["peak_memory_mb"] / 1024 if best.get("peak_memory_mb") else None
            lines.append(f"| {GPU_NAMES.get(config, config)} | {best['micro_batch']} | {best['tokens_per_s']:,.0f} | "
                         f"{best['tflops_per_s']:.1f} | {_num(best['mfu'], '.1%')} | {_num(memory, '.1f')} | "
                         f"{t['median']:.3f} ({t['p10']:.3f}-{t['p90']:.3f}) |")
        sweep = [f"{GPU_NAMES.get(c, c)} micro {t['micro_batch']}: "
                 + (f"{t['tokens_per_s']:,.0f}" if t["status"] == "ok" else t["status"]
                    + (f" ({t['reason']})" if t.get("reason") else ""))
                 for c, entry in r["configurations"].items() for t in entry["trials"] if t["seq_length"] == seq]
        lines += ["", "Micro batch sweep (tokens/s/GPU): " + "; ".join(sweep) + "."]
        ratios = r["ratios"].get(str(seq), {})
        if ratios:
            lines += ["", "Measured in the same run: " + ", ".join(
                f"{label} **{ratios[key]:.2f}x**" for key, label in (
                    ("megatron_over_plain", "Megatron / plain HF+PEFT"), ("megatron_over_hf_backend", "Megatron / hf backend"),
                    ("hf_backend_over_plain", "hf backend / plain HF+PEFT")) if key in ratios) + "."]
    targets = r.get("targets") or {}
    if targets:
        tps, ratio = targets["megatron_tokens_per_s_per_gpu"], targets["megatron_over_plain"]
        verdict = {True: "met", False: "**not met**", None: "not measured"}
        lines += ["", f"Targets (seq {targets['seq_length']}, written for an H100): Megatron >= {tps['target']:,} "
                  f"tokens/s/GPU: {_num(tps['measured'], ',.0f', 'none')} on {m.get('gpu', '?')}, {verdict[tps['met']]}; "
                  f"Megatron >= {ratio['target']:.0f}x plain HF+PEFT: {_num(ratio['measured'], '.2f', 'none')}x, "
                  f"{verdict[ratio['met']]}."]
    lines += ["", *parity_lines(r.get("parity")), "", f"Source: `{_source(path)}`."]
    return lines


def parity_lines(parity: dict | None) -> list[str]:
    if not parity:
        return ["### NeMo vs Hugging Face parity", "", "_Not measured in this run._"]
    a, trip = parity["nemo_vs_peft"], parity["round_trip"]
    lines = ["### NeMo vs Hugging Face parity", "",
             f"After {parity['steps']} LoRA steps with NeMo (run `{parity['run']}`), on {parity['prompts']} Japanese "
             f"prompts of {parity['prompt_tokens']} tokens from data/ja/cpt.validation.jsonl, CPU fp32: "
             f"{a['nemo_form']} vs {a['peft_form']}.", "",
             "| check | max abs logit diff | mean KL | top-1 agreement | tolerance |", "|---|---|---|---|---|",
             f"| NeMo vs HF+PEFT adapter ({a['positions']:,} positions) | {a['max_abs_diff']:.2e} | {a['mean_kl']:.2e} | "
             f"{a['top1_agreement']:.4f} | |"]
    for c in [*parity.get("import_checks", []), *parity.get("export_checks", [])]:
        lines.append(f"| {c['check']} ({c.get('positions', '?')} positions) | {c['max_abs_diff']:.2e} | | "
                     f"{c['argmax_agreement']:.4f} | {c['atol']:.0e}: {c.get('tolerance_reason', '')} |")
    extra = "".join(f"; only in {side}: {', '.join(trip[key])}" for key, side in
                    (("only_in_base", "the base"), ("only_in_export", "the export")) if trip.get(key))
    lines += ["", f"import -> export `hf` round trip: max |weight diff| {_num(trip['max_abs_diff'], '.2e', 'none')} over "
              f"{trip['tensors_compared']} tensors{extra}."]
    return lines


def main() -> int:
    text = ["# Benchmarks", "",
            "Every number below is read from a results file in `bench/results/` by `bench/report.py`; regenerate "
            "this file with `python bench/report.py` after running a benchmark.", "",
            "These CPU benchmarks ran on a 2-core machine that other work (test runs) shared at the same time. "
            "The headline figures are therefore ratios measured side by side in one run (A and B alternated, "
            "several rounds), which such load affects alike; absolute times and rates are only indicative.", "",
            *gpu_section(latest_gpu()), "",
            "## Data preparation (CPU)", "", *data_section(), "",
            "## Training throughput on CPU", "", *cpu_section(), "",
            "## End-to-end smoke run", "", *smoke_section(), "",
            "## Real-shape CPU tier", "", *real_shape_section(), ""]
    (REPO / "BENCHMARKS.md").write_text("\n".join(text))
    print(f"wrote {REPO / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The stages of an experiment, as the one function NeMo-Run tasks point at: `run_stage`.

import, data and eval are the same on both backends; cpt/sft training and export are the
backend's (jp_peft.backends.stages_of). Every stage ends by writing its record
(jp_peft.rundir.stage_record), which is what the launcher and later stages read.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from jp_peft import rundir
from jp_peft.backends import stages_of
from jp_peft.metrics import read_stage_metrics, relative_forgetting, relative_gain
from jp_peft.run_state import finished_earlier, fingerprint
from jp_peft.spec import SHARED_STAGES, TRAINED_STAGES, ExperimentSpec, experiment_from_dict


def _log(msg: str) -> None:
    print(f"[jp-peft] {msg}", flush=True)


# --- import -----------------------------------------------------------------------------------

def run_import(exp: ExperimentSpec, recipe=None) -> dict:
    """Make the Hugging Face base available (build the tiny one, or check the given one), then
    whatever else the backend needs of it (the NeMo checkpoint on Megatron)."""
    if exp.model.tiny:
        from jp_peft.tiny import ensure_tiny_base

        hf_dir = str(ensure_tiny_base(log=_log))
    else:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(exp.model.name)  # fails clearly if neither a local dir nor cached
        hf_dir = exp.model.name
    record = {"base_dir": hf_dir, "model": exp.model.name, "backend": exp.backend,
              **stages_of(exp.backend).import_model(exp, hf_dir, recipe)}
    rundir.write_json(rundir.import_record(exp), record)
    _log(f"import: base model at {hf_dir}")
    return record


# --- data -------------------------------------------------------------------------------------

def _prefix_ready(prefix: str) -> bool:
    return Path(prefix + ".bin").exists() and Path(prefix + ".idx").exists()


def run_data(exp: ExperimentSpec) -> dict:
    """Prepare every dataset of the spec that has a source and is not prepared yet, with `jp-peft data
    prepare`'s pipeline: on this machine's cores, or as Slurm array jobs when this stage is a Slurm job
    and the sources are large (jp_peft.data.engine.executor_for)."""
    from jp_peft.data.engine import executor_for
    from jp_peft.data.prepare import PrepareConfig
    from jp_peft.data.run import prepare

    tokenizer = rundir.base_model_dir(exp)
    reports = {}

    def text(prefix: str, sources, lang: str) -> None:
        if _prefix_ready(prefix) or not sources:
            return
        cfg = PrepareConfig(inputs=tuple(sources), output_prefix=prefix.removesuffix("_text_document"),
                            tokenizer=tokenizer, format="text", min_ja_ratio=0.3 if lang == "ja" else 0.0,
                            **executor_for(sources))
        reports[prefix] = _summary(prepare(cfg))

    for stage in TRAINED_STAGES:
        if stage not in exp.stages:
            continue
        data = exp.stage(stage).data
        for entry in data.blend if stage == "cpt" else ():
            text(entry.prefix, entry.source, entry.lang)
        text(data.val_ja, data.val_ja_source, "ja")
        text(data.val_en, data.val_en_source, "en")
        if stage == "sft" and data.sft_train and not Path(data.sft_train).exists():
            root = str(Path(data.sft_train).parent)  # dataset_root/training.jsonl
            cfg = PrepareConfig(inputs=tuple(data.sft_source), output_prefix=root, tokenizer=tokenizer,
                                format=data.sft_format, min_chars=2, min_ja_ratio=0.0, val_fraction=0.05,
                                **executor_for(data.sft_source))
            reports[root] = _summary(prepare(cfg))
    for name, report in reports.items():
        _log(f"data: {Path(name).name}: read {report['read']}, kept {report['kept']}, "
             f"rejected {report['rejected_total']}, {report['tokens']} tokens, {report['chars_per_token']} chars/token")
    rundir.write_json(rundir.data_record(exp), reports)
    return reports


def _summary(report: dict) -> dict:
    return {k: report[k] for k in ("read", "kept", "rejected_total", "rejected", "tokens", "chars", "chars_per_token",
                                   "outputs")}


# --- training and export (the backend's) ------------------------------------------------------

def run_train(exp: ExperimentSpec, stage: str, recipe=None):
    metrics = stages_of(exp.backend).train(exp, stage, recipe)
    metrics = dataclasses.replace(metrics, spec_fingerprint=fingerprint(exp))
    metrics.write(rundir.metrics_file(exp, stage))
    _log(f"{stage}: ja ppl {metrics.base_val_ppl_ja:.2f} -> {metrics.val_ppl_ja:.2f}, "
         f"en ppl {metrics.base_val_ppl_en:.2f} -> {metrics.val_ppl_en:.2f}, {metrics.wall_seconds:.1f} s")
    return metrics


def run_export(exp: ExperimentSpec, target: str) -> dict:
    if target not in TRAINED_STAGES:
        raise ValueError(f"export: --target must be one of {', '.join(TRAINED_STAGES)}, got {target!r}")
    record = stages_of(exp.backend).export(exp, target) | {"spec_fingerprint": fingerprint(exp)}
    rundir.write_json(rundir.export_record(exp, target), record)
    return record


# --- evaluation -------------------------------------------------------------------------------

def run_eval(exp: ExperimentSpec) -> dict:
    """Summary of the experiment: Japanese gain and English forgetting per stage, in validation perplexity
    and in downstream task scores (jp_peft.evaluation: base and every trained stage on the spec's tasks)."""
    rows = []
    for stage in TRAINED_STAGES:
        if stage not in exp.stages:
            continue
        m = read_stage_metrics(rundir.metrics_file(exp, stage))
        exported = rundir.read_json(rundir.export_record(exp, stage), "eval") if "export" in exp.stages else {}
        rows.append({"stage": stage, "ja_ppl_before": m.base_val_ppl_ja, "ja_ppl_after": m.val_ppl_ja,
                     "en_ppl_before": m.base_val_ppl_en, "en_ppl_after": m.val_ppl_en,
                     "steps": m.steps, "method": m.method, "trainable_params": m.trainable_params,
                     "early_stopped_at_step": m.early_stopped_at_step, "tokens_per_second": m.tokens_per_second, "wall_seconds": m.wall_seconds,
                     "adapter": exported.get("hf_adapter"), "merged": exported.get("hf_merged")})
    for path in (rundir.eval_results(exp), rundir.eval_samples(exp)):
        path.unlink(missing_ok=True)  # never an earlier spec's scores beside this summary
    downstream = None
    if exp.eval.downstream or exp.eval.generation:
        from jp_peft.evaluation.suite import run_suite

        downstream = run_suite(exp, _log)
    for row in rows:
        scores = (downstream or {}).get("models", {}).get(row["stage"], {})
        row.update({key: scores.get(key) for key in DOWNSTREAM_KEYS})
    summary = {"experiment": exp.name, "group": exp.group_name, "backend": exp.backend, "stages": rows,
               "downstream": downstream, "written": time.time(), "spec_fingerprint": fingerprint(exp, "eval")}
    rundir.write_json(rundir.summary_file(exp), summary)
    print(format_summary(summary), flush=True)
    return summary


# per trained stage in summary.json, in points: task averages, and gain/forgetting against base
DOWNSTREAM_KEYS = ("ja_avg", "en_avg", "ja_gain", "en_forgetting")


def format_summary(summary: dict) -> str:
    from jp_peft.evaluation.summary import format_downstream

    downstream = summary.get("downstream")
    points = downstream is not None
    lines = [f"\n{summary['experiment']}: Japanese gain and English forgetting (validation perplexity"
             + ("; downstream task averages in points, against base)" if points else ")"),
             f"{'stage':<6} {'JA before':>10} {'JA after':>10} {'gain':>8} {'EN before':>10} {'EN after':>10} {'forget':>8}"
             + (f" {'JA avg':>7} {'JA gain':>7} {'EN avg':>7} {'EN forget':>9}" if points else "")]
    if points:
        base = downstream["models"].get("base", {})
        lines.append(f"{'base':<6} {'':>10} {'':>10} {'':>8} {'':>10} {'':>10} {'':>8} {_pt(base.get('ja_avg')):>7} "
                     f"{'':>7} {_pt(base.get('en_avg')):>7}")
    for r in summary["stages"]:
        gain = relative_gain(r["ja_ppl_before"], r["ja_ppl_after"])
        forget = relative_forgetting(r["en_ppl_before"], r["en_ppl_after"])
        line = (f"{r['stage']:<6} {r['ja_ppl_before']:>10.2f} {r['ja_ppl_after']:>10.2f} {gain:>7.1f}% "
                f"{r['en_ppl_before']:>10.2f} {r['en_ppl_after']:>10.2f} {forget:>7.1f}%")
        if points:
            line += (f" {_pt(r.get('ja_avg')):>7} {_pt(r.get('ja_gain'), True):>7} {_pt(r.get('en_avg')):>7} "
                     f"{_pt(r.get('en_forgetting'), True):>9}")
        lines.append(line)
    if points and downstream["models"]:
        lines.append(format_downstream(downstream))
    for r in summary["stages"]:
        adapter = r["adapter"] or f"none (method {r.get('method', 'full')}: the merged model is the result)"
        lines.append(f"  {r['stage']}: adapter {adapter}\n  {r['stage']}: merged  {r['merged']}")
    return "\n".join(lines)


def _pt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


# --- the task entry point ---------------------------------------------------------------------

def run_stage(spec: dict, stage: str, target: str | None = None, recipe=None):
    """Single entry point of every NeMo-Run task, both backends. `recipe` is the built NeMo recipe of
    a Megatron import or training stage (a functools.partial of llm.import_ckpt / llm.finetune)."""
    exp = experiment_from_dict(spec)
    started = time.perf_counter()
    if stage not in SHARED_STAGES:  # the shared stages are idempotent by themselves (reused checkpoint, prefixes)
        record = rundir.stage_record(exp, stage, target)
        if finished_earlier(record, fingerprint(exp, stage)):
            _log(f"{stage}{' ' + target if target else ''}: done earlier with the same spec ({record}); kept")
            return None
        record.unlink(missing_ok=True)  # a stage that runs again never leaves an older record looking current
    try:
        if stage == "import":
            return run_import(exp, recipe)
        if stage == "data":
            return run_data(exp)
        if stage in TRAINED_STAGES:
            return run_train(exp, stage, recipe)
        if stage == "export":
            return run_export(exp, target)
        if stage == "eval":
            return run_eval(exp)
        raise ValueError(f"unknown stage {stage!r}")
    finally:
        _log(f"stage {stage} ended after {time.perf_counter() - started:.1f} s")
        sys.stdout.flush()

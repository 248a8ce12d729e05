"""The stages of an experiment, as the one function NeMo-Run tasks point at: `run_stage`.

`run_stage` dispatches on the stage table's kind (jp_peft.spec.stages): import, data and eval are the
same on every backend; training and export are the backend's (jp_peft.backends.backend_of). Every
stage ends by writing its record (jp_peft.records.layout.stage_record), which is what the launcher
and later stages read.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from jp_peft.backends import backend_of
from jp_peft.records import layout as rundir
from jp_peft.records.export_record import ExportRecord
from jp_peft.records.fingerprint import finished_earlier, fingerprint
from jp_peft.records.metrics import read_stage_metrics
from jp_peft.run.summary import DOWNSTREAM_KEYS, format_summary
from jp_peft.spec import ExperimentSpec, experiment_from_dict
from jp_peft.spec.stages import (BLEND, CHAT, DATA, EVAL, EXPORT, IMPORT, PREFERENCE, TRAIN, stage as stage_row,
                                 trained_with)


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
              **backend_of(exp).import_model(exp, hf_dir, recipe)}
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

    for stage in exp.trained_stages:
        data = exp.stage(stage).data
        for entry in data.blend if stage in trained_with(BLEND) else ():
            text(entry.prefix, entry.source, entry.lang)
        text(data.val_ja, data.val_ja_source, "ja")
        text(data.val_en, data.val_en_source, "en")
        if stage in trained_with(CHAT) and data.sft_train and not Path(data.sft_train).exists():
            root = str(Path(data.sft_train).parent)  # dataset_root/training.jsonl
            cfg = PrepareConfig(inputs=tuple(data.sft_source), output_prefix=root, tokenizer=tokenizer,
                                format=data.sft_format, min_chars=2, min_ja_ratio=0.0, val_fraction=0.05,
                                **executor_for(data.sft_source))
            reports[root] = _summary(prepare(cfg))
        for split in ("train", "validation") if stage in trained_with(PREFERENCE) else ():
            path, sources = getattr(data, split), getattr(data, f"{split}_source")
            if path and sources and not Path(path).exists():  # PREFIX/training.jsonl: one prefix per split
                root = str(Path(path).parent)
                cfg = PrepareConfig(inputs=tuple(sources), output_prefix=root, tokenizer=tokenizer, format=PREFERENCE,
                                    min_chars=2, min_ja_ratio=0.0, **executor_for(sources))
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
    from jp_peft.training.ranks import is_rank_zero, placement, wait_for_all_ranks

    if where := placement():
        _log(f"{stage}: {where}")
    metrics = backend_of(exp).train(exp, stage, recipe)
    metrics = dataclasses.replace(metrics, spec_fingerprint=fingerprint(exp, stage))
    wait_for_all_ranks()  # every rank finished training before the record says the stage is done
    if not is_rank_zero():
        return metrics
    metrics.write(rundir.metrics_file(exp, stage))
    _log(f"{stage}: ja ppl {metrics.base_val_ppl_ja:.2f} -> {metrics.val_ppl_ja:.2f}, "
         f"en ppl {metrics.base_val_ppl_en:.2f} -> {metrics.val_ppl_en:.2f}, {metrics.wall_seconds:.1f} s")
    return metrics


def run_export(exp: ExperimentSpec, target: str) -> dict:
    if target not in exp.trained_stages:
        raise ValueError(f"export: --target must be one of the run's trained stages "
                         f"({', '.join(exp.trained_stages) or 'none'}), got {target!r}")
    from jp_peft.export.deployability import deployability, served_name
    from jp_peft.export.model_card import write_cards

    record = backend_of(exp).export(exp, target)
    record = dataclasses.replace(record, deployability=deployability(record, served_name(exp, target)),
                                 spec_fingerprint=fingerprint(exp))
    for card in write_cards(exp, target, record):  # both backends' exports end here: one place writes the cards
        _log(f"export {target}: model card {card}")
    record.write(rundir.export_record(exp, target))  # last: the record says the export (cards included) is done
    return record.to_dict()


# --- evaluation -------------------------------------------------------------------------------

def run_eval(exp: ExperimentSpec) -> dict:
    """Summary of the experiment: Japanese gain and English forgetting per stage, in validation perplexity
    and in downstream task scores (jp_peft.evaluation: base and every trained stage on the spec's tasks)."""
    rows = []
    for stage in exp.trained_stages:
        m = read_stage_metrics(rundir.metrics_file(exp, stage))
        record = ExportRecord.read(rundir.export_record(exp, stage), "eval") if exp.exports else None
        rows.append({"stage": stage, "ja_ppl_before": m.base_val_ppl_ja, "ja_ppl_after": m.val_ppl_ja,
                     "en_ppl_before": m.base_val_ppl_en, "en_ppl_after": m.val_ppl_en,
                     "steps": m.steps, "method": m.method, "trainable_params": m.trainable_params,
                     "early_stopped_at_step": m.early_stopped_at_step, "tokens_per_second": m.tokens_per_second, "wall_seconds": m.wall_seconds,
                     "adapter": record.hf_adapter if record else None, "merged": record.hf_merged if record else None})
    for path in (rundir.eval_results(exp), rundir.eval_samples(exp)):
        path.unlink(missing_ok=True)  # never an earlier spec's scores beside this summary
    downstream = None
    if exp.eval.downstream or exp.eval.generation:
        from jp_peft.evaluation.suite import run_suite

        downstream = run_suite(exp, _log)
    for row in rows:
        scores = (downstream or {}).get("models", {}).get(row["stage"], {})
        row.update({key: scores.get(key) for key in DOWNSTREAM_KEYS})
    if exp.exports:  # the export stage wrote the cards before any score existed: now with this run's scores
        from jp_peft.export.model_card import refresh_cards

        for stage in exp.trained_stages:
            refresh_cards(exp, stage, ExportRecord.read(rundir.export_record(exp, stage), "model cards"))
    summary = {"experiment": exp.name, "group": exp.group_name, "backend": exp.backend, "stages": rows,
               "downstream": downstream, "written": time.time(), "spec_fingerprint": fingerprint(exp, EVAL)}
    rundir.write_json(rundir.summary_file(exp), summary)
    print(format_summary(summary), flush=True)
    return summary


# --- the task entry point ---------------------------------------------------------------------

def run_stage(spec: dict, stage: str, target: str | None = None, recipe=None):
    """Single entry point of every NeMo-Run task, both backends. `recipe` is the built NeMo recipe of
    a Megatron import or training stage (a functools.partial of llm.import_ckpt / llm.finetune)."""
    exp = experiment_from_dict(spec)
    started = time.perf_counter()
    kind = stage_row(stage).kind
    if not stage_row(stage).shared:  # the shared stages are idempotent by themselves (reused checkpoint, prefixes)
        record = rundir.stage_record(exp, stage, target)
        if finished_earlier(record, fingerprint(exp, stage)):
            _log(f"{stage}{' ' + target if target else ''}: done earlier with the same spec ({record}); kept")
            return None
        record.unlink(missing_ok=True)  # a stage that runs again never leaves an older record looking current
    try:
        if kind == IMPORT:
            return run_import(exp, recipe)
        if kind == DATA:
            return run_data(exp)
        if kind == TRAIN:
            return run_train(exp, stage, recipe)
        if kind == EXPORT:
            return run_export(exp, target)
        assert kind == EVAL, kind
        return run_eval(exp)
    finally:
        _log(f"stage {stage} ended after {time.perf_counter() - started:.1f} s")
        sys.stdout.flush()

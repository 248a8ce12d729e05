"""The stages of an experiment, as importable functions that NeMo-Run tasks point at.

Each takes the resolved spec as a plain dict (NeMo-Run serialises it into the task) and the
stage name. Shared stages (import, data) write under the group directory; trained stages
under the run directory: DIR/NAME/{cpt,sft}/ with hf_adapter/, hf_merged/, metrics.json.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from jp_peft.spec import ExperimentSpec, experiment_from_dict

TRAINED = ("cpt", "sft")


def _log(msg: str) -> None:
    print(f"[jp-peft] {msg}", flush=True)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path, needed_by: str) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"{needed_by}: {path} not found; did the stage that writes it finish?")
    return json.loads(path.read_text(encoding="utf-8"))


def base_dir_of(spec: ExperimentSpec) -> str:
    return _read_json(spec.group_dir / "import" / "base.json", "base model")["base_dir"]


# --- import -----------------------------------------------------------------------------

def run_import(spec: dict) -> str:
    """hf backend: make the base model available locally (build the tiny one, or check the HF one)."""
    exp = experiment_from_dict(spec)
    if exp.model.tiny:
        from jp_peft.tiny import ensure_tiny_base

        base = str(ensure_tiny_base(log=_log))
    else:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(exp.model.name)  # fails clearly if neither a local dir nor cached
        base = exp.model.name
    _write_json(exp.group_dir / "import" / "base.json", {"base_dir": base, "model": exp.model.name})
    _log(f"import: base model at {base}")
    return base


# --- data -------------------------------------------------------------------------------

def _prefix_ready(prefix: str) -> bool:
    return Path(prefix + ".bin").exists() and Path(prefix + ".idx").exists()


def run_data(spec: dict) -> dict:
    """Prepare every dataset of the spec that has a source and is not prepared yet."""
    from jp_peft.data.prepare import PrepareConfig, prepare

    exp = experiment_from_dict(spec)
    tokenizer = base_dir_of(exp)
    reports = {}

    def text(prefix: str, sources, lang: str) -> None:
        if _prefix_ready(prefix) or not sources:
            return
        cfg = PrepareConfig(inputs=tuple(sources), output_prefix=prefix.removesuffix("_text_document"),
                            tokenizer=tokenizer, format="text", min_ja_ratio=0.3 if lang == "ja" else 0.0,
                            workers=min(2, os.cpu_count() or 1))
        reports[prefix] = _summary(prepare(cfg))

    for stage in TRAINED:
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
                                workers=1)
            reports[root] = _summary(prepare(cfg))
    for name, report in reports.items():
        _log(f"data: {Path(name).name}: read {report['read']}, kept {report['kept']}, "
             f"rejected {report['rejected_total']}, {report['tokens']} tokens, {report['chars_per_token']} chars/token")
    _write_json(exp.group_dir / "data" / "prepared.json", reports)
    return reports


def _summary(report: dict) -> dict:
    return {k: report[k] for k in ("read", "kept", "rejected_total", "rejected", "tokens", "chars", "chars_per_token",
                                   "outputs")}


def stage_paths(exp: ExperimentSpec, stage: str) -> dict[str, Any]:
    data = exp.stage(stage).data
    paths = {"val_ja": data.val_ja, "val_en": data.val_en}
    if stage == "cpt":
        paths["blend_prefixes"] = [b.prefix for b in data.blend]
    else:
        paths["sft_train"] = data.sft_train
    return paths


# --- training (hf backend) --------------------------------------------------------------

def stage_base(exp: ExperimentSpec, stage: str) -> str:
    """SFT continues from the CPT result (its merged model) when the experiment has a CPT stage."""
    if stage == "sft" and "cpt" in exp.stages:
        merged = exp.run_dir / "cpt" / "hf_merged"
        _read_json(exp.run_dir / "cpt" / "metrics.json", "sft starts from the cpt result")
        return str(merged.resolve())
    return base_dir_of(exp)


def run_train(spec: dict, stage: str) -> dict:
    from jp_peft.backends.hf import export_hf, train_stage
    from jp_peft.callbacks.wandb_run import log_adapter_artifact, wandb_logger
    from jp_peft.tracking import flops_per_token_fn

    exp = experiment_from_dict(spec)
    stage_dir = exp.run_dir / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    base = stage_base(exp, stage)
    _log(f"{stage}: LoRA r={exp.lora.rank} alpha={exp.lora.alpha} on {base}")
    logger = wandb_logger(exp, stage)
    metrics, model, tokenizer = train_stage(exp, stage, base, stage_dir, stage_paths(exp, stage),
                                            [logger] if logger else [], [], flops_per_token_fn)
    metrics.update(export_hf(model, tokenizer, base, stage_dir))
    metrics["base_model"] = base
    _write_json(stage_dir / "metrics.json", metrics)
    if logger is not None:
        log_adapter_artifact(logger, exp, stage, stage_dir / "hf_adapter", metrics)
        logger.experiment.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        logger.experiment.finish()
    _log(f"{stage}: ja ppl {metrics['base_val_ppl_ja']:.2f} -> {metrics['val_ppl_ja']:.2f}, "
         f"en ppl {metrics['base_val_ppl_en']:.2f} -> {metrics['val_ppl_en']:.2f}, {metrics['wall_seconds']:.1f} s")
    return metrics


# --- export check and evaluation --------------------------------------------------------

def run_export(spec: dict, target: str) -> dict:
    """Check the exported adapter of stage `target`: PEFT adapter + base gives the merged model's logits."""
    from jp_peft.export.verify import compare_adapter_and_merged

    exp = experiment_from_dict(spec)
    stage_dir = exp.run_dir / target
    _read_json(stage_dir / "metrics.json", f"export of {target}")
    result = compare_adapter_and_merged(stage_dir / "hf_adapter", stage_dir / "hf_merged", exp.stage(target).data.val_ja)
    _log(f"export: {target}: adapter+base vs merged logits max |diff| {result['max_abs_diff']:.2e}, "
         f"argmax agreement {result['argmax_agreement']:.4f}")
    if not result["ok"]:
        raise RuntimeError(f"export: {target}: adapter+base logits differ from the merged model by "
                           f"{result['max_abs_diff']:.2e} > {result['atol']}")
    _write_json(stage_dir / "export_check.json", result)
    return result


def run_eval(spec: dict) -> dict:
    """Summary of the experiment: Japanese gain and English forgetting per stage."""
    exp = experiment_from_dict(spec)
    rows = []
    for stage in TRAINED:
        if stage not in exp.stages:
            continue
        m = _read_json(exp.run_dir / stage / "metrics.json", "eval")
        rows.append({"stage": stage, "ja_ppl_before": m["base_val_ppl_ja"], "ja_ppl_after": m["val_ppl_ja"],
                     "en_ppl_before": m["base_val_ppl_en"], "en_ppl_after": m["val_ppl_en"],
                     "steps": m["steps"], "tokens_per_second": m["tokens_per_second"],
                     "wall_seconds": m["wall_seconds"], "adapter": m.get("hf_adapter"), "merged": m.get("hf_merged")})
    summary = {"experiment": exp.name, "group": exp.group_name, "stages": rows, "written": time.time()}
    _write_json(exp.run_dir / "summary.json", summary)
    print(format_summary(summary), flush=True)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"\n{summary['experiment']}: Japanese gain and English forgetting (validation perplexity)",
             f"{'stage':<6} {'JA before':>10} {'JA after':>10} {'gain':>8} {'EN before':>10} {'EN after':>10} {'forget':>8}"]
    for r in summary["stages"]:
        gain = (r["ja_ppl_before"] - r["ja_ppl_after"]) / r["ja_ppl_before"] * 100
        forget = (r["en_ppl_after"] - r["en_ppl_before"]) / r["en_ppl_before"] * 100
        lines.append(f"{r['stage']:<6} {r['ja_ppl_before']:>10.2f} {r['ja_ppl_after']:>10.2f} {gain:>7.1f}% "
                     f"{r['en_ppl_before']:>10.2f} {r['en_ppl_after']:>10.2f} {forget:>7.1f}%")
    for r in summary["stages"]:
        lines.append(f"  {r['stage']}: adapter {r['adapter']}\n  {r['stage']}: merged  {r['merged']}")
    return "\n".join(lines)


def run_stage(spec: dict, stage: str, target: str | None = None):
    """Single entry point for NeMo-Run tasks of the hf backend."""
    started = time.perf_counter()
    try:
        if stage == "import":
            return run_import(spec)
        if stage == "data":
            return run_data(spec)
        if stage in TRAINED:
            return run_train(spec, stage)
        if stage == "export":
            return run_export(spec, target)
        if stage == "eval":
            return run_eval(spec)
        raise ValueError(f"unknown stage {stage!r}")
    finally:
        _log(f"stage {stage} ended after {time.perf_counter() - started:.1f} s")
        sys.stdout.flush()

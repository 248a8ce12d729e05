"""`jp-peft compare RUN_DIR...`: two tables and five figures for a set of finished runs, offline.

Reads each run's own files (spec.json, <stage>/metrics.json, <stage>/train_log.jsonl, eval/results.json).
The run table: the config keys that differ between runs, each stage's method and trainable parameters,
final Japanese/English perplexity, gain, forgetting, downstream JA/EN task averages with gain and
forgetting in points against base, throughput, MFU and wall time. The stage table: a row per run and
stage (base, cpt, sft), each against base and against the stage before. The figures: JA and EN
validation loss against consumed tokens (val_history), train loss per stage, gain and forgetting in
percent of the base perplexity, the same in task points with lm-eval's stderr, and the task averages.
A run without downstream results has blank downstream cells and nothing in those figures.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from jp_peft.records import layout as rundir
from jp_peft.evaluation.summary import BASE, downstream_summary
from jp_peft.records.metrics import (CONSUMED_TOKENS, STEP, downstream_forgetting, downstream_gain, read_stage_metrics,
                                     read_train_log, relative_forgetting, relative_gain, step_rows, val_loss_key)
from jp_peft.records.layout import MissingRecord, read_json
from jp_peft.spec import TRAINED_STAGES
from jp_peft.compare_figures import write_plots

IGNORED_KEYS = ("name", "group", "output_dir")  # differ by construction, say nothing about the recipe
# downstream columns, in points, of the last trained stage: blank for a run without eval/results.json
DOWNSTREAM_COLUMNS = {"ja_avg": "ja_avg", "en_avg": "en_avg", "ja_gain_pt": "ja_gain", "en_forgetting_pt": "en_forgetting"}


def flatten_config(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(flatten_config(value, f"{prefix}.{key}" if prefix else key))
        return out
    if isinstance(node, list) and node and all(isinstance(v, dict) for v in node):  # the blend: one column per field
        out = {}
        for i, value in enumerate(node):
            out.update(flatten_config(value, f"{prefix}[{i}]"))
        return out
    return {prefix: json.dumps(node) if isinstance(node, list) else node}


def load_run(run_dir: Path) -> dict[str, Any]:
    """A run's spec, metrics records and step rows; a missing or corrupt file raises MissingRecord naming it."""
    if not run_dir.is_dir():
        raise MissingRecord(f"{run_dir}: no such run directory")
    spec_path = rundir.spec_file_of(run_dir)
    if not spec_path.exists():
        raise MissingRecord(f"{run_dir}: no spec.json; is this a run directory (DIR/NAME)?")
    run = {"dir": run_dir, "name": run_dir.name, "spec": read_json(spec_path, "compare"), "stages": {}}
    for stage in TRAINED_STAGES:
        metrics = rundir.metrics_file_of(run_dir, stage)
        if metrics.exists():
            log = rundir.train_log_of(run_dir, stage)
            rows = read_train_log(log) if log.exists() else []
            record = read_stage_metrics(metrics).to_dict()
            run["stages"][stage] = {"metrics": record, "log": step_rows(rows), "val": validation_curve(record, rows)}
    if not run["stages"]:
        raise MissingRecord(f"{run_dir}: no finished stage (no <stage>/metrics.json)")
    run["downstream"] = load_downstream(run_dir)
    return run


def validation_curve(metrics: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, float]]:
    """[{"tokens", "ja", "en"}]: the stage's JA/EN validation loss against the tokens it had consumed, from
    the starting model's (0 tokens) through every validation of val_history. A step's tokens are the
    train log's; without a log row, steps x the stage's tokens per step."""
    tokens_at = {r[STEP]: r[CONSUMED_TOKENS] for r in rows if STEP in r and CONSUMED_TOKENS in r}
    per_step = metrics["consumed_tokens"] / metrics["steps"] if metrics.get("steps") else 0.0
    curve = [{"tokens": 0.0, "ja": metrics["base_val_loss_ja"], "en": metrics["base_val_loss_en"]}]
    for entry in metrics.get("val_history") or []:
        step = entry.get(STEP)
        if step is None or val_loss_key("ja") not in entry or val_loss_key("en") not in entry:
            continue
        curve.append({"tokens": float(tokens_at.get(step, step * per_step)), "ja": entry[val_loss_key("ja")],
                      "en": entry[val_loss_key("en")]})
    return curve


def load_downstream(run_dir: Path) -> dict[str, Any] | None:
    """The run's downstream summary (jp_peft.evaluation.summary), None when it has no eval/results.json."""
    path = rundir.eval_results_of(run_dir)
    if not path.exists():
        return None
    try:
        return downstream_summary(read_json(path, "compare"))
    except (KeyError, TypeError, AttributeError) as exc:
        raise MissingRecord(f"{path}: not an eval stage results file ({type(exc).__name__}: {exc}); rerun the eval "
                            "stage") from None


def config_differences(runs: list[dict]) -> list[str]:
    flat = [flatten_config(r["spec"]) for r in runs]
    keys = sorted(set().union(*flat))
    return [k for k in keys if not k.split(".")[-1] in IGNORED_KEYS and "source" not in k and "prefix" not in k
            and len({json.dumps(f.get(k)) for f in flat}) > 1]


def summary_rows(runs: list[dict], diff_keys: list[str]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        flat = flatten_config(run["spec"])
        last_stage = [s for s in TRAINED_STAGES if s in run["stages"]][-1]
        first = run["stages"][[s for s in TRAINED_STAGES if s in run["stages"]][0]]["metrics"]
        last = run["stages"][last_stage]["metrics"]
        mfu = [r["perf/mfu"] for s in run["stages"].values() for r in s["log"] if r.get("perf/mfu") is not None]
        row = {"run": run["name"], **{k: flat.get(k) for k in diff_keys},
               "stages": "+".join(run["stages"]),
               # per stage, in stage order: what it trained and how many parameters that was
               "method": "+".join(s["metrics"].get("method", "lora") for s in run["stages"].values()),
               "trainable_params": "+".join(f"{s['metrics']['trainable_params']:,}" for s in run["stages"].values()),
               "ja_ppl_base": first["base_val_ppl_ja"], "ja_ppl": last["val_ppl_ja"],
               "ja_gain_%": relative_gain(first["base_val_ppl_ja"], last["val_ppl_ja"]),
               "en_ppl_base": first["base_val_ppl_en"], "en_ppl": last["val_ppl_en"],
               "en_forgetting_%": relative_forgetting(first["base_val_ppl_en"], last["val_ppl_en"]),
               "tokens_per_s": sum(s["metrics"]["tokens_per_second"] for s in run["stages"].values()) / len(run["stages"]),
               "mfu_%": 100 * sum(mfu) / len(mfu) if mfu else None,
               "wall_s": sum(s["metrics"]["wall_seconds"] for s in run["stages"].values())}
        scores = (run["downstream"] or {}).get("models", {}).get(last_stage, {})
        row.update({column: scores.get(key) for column, key in DOWNSTREAM_COLUMNS.items()})
        rows.append(row)
    # a preference stage's validation reward accuracy, before -> after (a column only when a run has one)
    rewards = [next((f"{e['reward_accuracy_before']:.3f} -> {e['reward_accuracy_after']:.3f}"
                     for s in reversed(list(run["stages"].values()))
                     if "reward_accuracy_after" in (e := s["metrics"].get("extra") or {})), None) for run in runs]
    if any(rewards):
        for row, reward in zip(rows, rewards):
            row["reward_acc"] = reward
    return rows


def _fmt(value: Any, blank: str = "n/a") -> str:
    if value is None:
        return blank
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _combined(*stderrs: float | None) -> float | None:
    """The stderr of a difference of two independent averages (the same items make it smaller: an upper bound)."""
    if any(s is None for s in stderrs):
        return None
    return math.sqrt(sum(s * s for s in stderrs))


def stage_rows(runs: list[dict]) -> list[dict[str, Any]]:
    """A row per run and stage (base, then each trained stage in order): perplexities, gain and forgetting in
    percent against base and against the stage before; task averages with stderr, gain and forgetting in
    points against both."""
    rows = []
    for run in runs:
        stages = [s for s in TRAINED_STAGES if s in run["stages"]]
        first = run["stages"][stages[0]]["metrics"]
        models = (run["downstream"] or {}).get("models", {})
        points = [(BASE, first["base_val_ppl_ja"], first["base_val_ppl_en"])]
        points += [(s, run["stages"][s]["metrics"]["val_ppl_ja"], run["stages"][s]["metrics"]["val_ppl_en"]) for s in stages]
        for i, (stage, ja, en) in enumerate(points):
            prev = points[max(i - 1, 0)]
            scores, base_scores = models.get(stage, {}), models.get(BASE, {})
            prev_scores = models.get(prev[0], {})
            row = {"run": run["name"], "stage": stage, "ja_ppl": ja, "en_ppl": en,
                   "ja_gain_%": relative_gain(points[0][1], ja), "en_forgetting_%": relative_forgetting(points[0][2], en),
                   "ja_gain_%_vs_prev": relative_gain(prev[1], ja) if i else None,
                   "en_forgetting_%_vs_prev": relative_forgetting(prev[2], en) if i else None,
                   "ja_avg": scores.get("ja_avg"), "ja_avg_stderr": scores.get("ja_avg_stderr"),
                   "en_avg": scores.get("en_avg"), "en_avg_stderr": scores.get("en_avg_stderr"),
                   "ja_gain_pt": downstream_gain(base_scores.get("ja_avg"), scores.get("ja_avg")),
                   "en_forgetting_pt": downstream_forgetting(base_scores.get("en_avg"), scores.get("en_avg")),
                   "ja_gain_pt_vs_prev": downstream_gain(prev_scores.get("ja_avg"), scores.get("ja_avg")) if i else None,
                   "en_forgetting_pt_vs_prev": (downstream_forgetting(prev_scores.get("en_avg"), scores.get("en_avg"))
                                                if i else None),
                   "ja_gain_pt_stderr": _combined(scores.get("ja_avg_stderr"), base_scores.get("ja_avg_stderr")) if i else None,
                   "en_forgetting_pt_stderr": (_combined(scores.get("en_avg_stderr"), base_scores.get("en_avg_stderr"))
                                               if i else None)}
            rows.append(row)
    return rows


# What each figure shows: the HTML's captions and the Markdown's list (one text, two places).
FIGURES = {
    "val_loss_vs_tokens.png": "Held-out Japanese (left) and English (right) validation loss (token-mean cross-entropy, "
                              "nats) against the tokens each stage has consumed, one colour per run, solid for CPT and "
                              "dashed for SFT; SFT's curve starts where CPT's ended (its tokens continue CPT's). "
                              "The point at 0 tokens is the base model. Down on the left is the Japanese gain, up on "
                              "the right the English forgetting.",
    "loss_vs_tokens.png": "Training loss against consumed tokens, one panel per stage: CPT's is the loss on the "
                          "JA/EN blend, SFT's the loss on assistant tokens only, so the two are not comparable and "
                          "are not drawn on one axis.",
    "gain_forgetting_ppl.png": "Japanese gain (x) and English forgetting (y) in percent of the base model's validation "
                               "perplexity, base -> cpt -> sft per run (marker: stage). Both axes include zero (the "
                               "base); right is better Japanese, up is worse English.",
    "gain_forgetting_tasks.png": "The same in downstream task points (eval/results.json): JA task-average gain (x) and "
                                 "EN task-average forgetting (y) against base. Error bars: one lm-eval stderr of the "
                                 "difference, combining the model's and the base's (the same items make the true "
                                 "uncertainty of a difference smaller, so the bars are an upper bound).",
    "task_averages.png": "JA (left) and EN (right) task averages in points per run and model, from zero, with one "
                         "stderr of the average (lm-eval's task stderrs combined) as error bars.",
}


def _table_md(rows: list[dict], blanks: tuple[str, ...]) -> list[str]:
    headers = list(rows[0])
    cell = {h: "" if h in blanks else "n/a" for h in headers}
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return md + ["| " + " | ".join(_fmt(r[h], cell[h]) for h in headers) + " |" for r in rows]


def _table_html(rows: list[dict], blanks: tuple[str, ...]) -> str:
    headers = list(rows[0])
    cell = {h: "" if h in blanks else "n/a" for h in headers}
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r[h], cell[h]))}</td>" for h in headers) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


STAGE_BLANKS = ("ja_gain_%_vs_prev", "en_forgetting_%_vs_prev", "ja_avg", "ja_avg_stderr", "en_avg", "en_avg_stderr",
                "ja_gain_pt", "en_forgetting_pt", "ja_gain_pt_vs_prev", "en_forgetting_pt_vs_prev", "ja_gain_pt_stderr",
                "en_forgetting_pt_stderr")
STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;font-size:13px;"
         "margin-bottom:1.5em}td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}"
         "th{background:#f4f4f4}figure{margin:1.5em 0}figcaption{max-width:900px;color:#333}"
         ".warning{color:#a00}")


def write_tables(rows: list[dict], out: Path, stages: list[dict] | None = None,
                 warnings: list[str] = ()) -> tuple[Path, Path]:
    blanks = tuple(DOWNSTREAM_COLUMNS)
    md = ["# jp-peft compare", ""] + [f"> warning: {w}" for w in warnings] + (["" ] if warnings else [])
    md += ["## Runs (last stage against base)", "", *_table_md(rows, blanks)]
    if stages:
        md += ["", "## Stages (each against base and against the stage before)", "", *_table_md(stages, STAGE_BLANKS)]
    md += ["", "## Figures", ""] + [f"- `{name}`: {text}" for name, text in FIGURES.items()]
    md_path = out / "compare.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    warn = "".join(f"<p class='warning'>warning: {html.escape(w)}</p>" for w in warnings)
    stage_html = ("<h2>Stages: each against base and against the stage before</h2>"
                  "<p>Perplexity gain and forgetting in percent, task averages and their changes in points "
                  "(stderr: lm-eval's).</p>" + _table_html(stages, STAGE_BLANKS)) if stages else ""
    figures = "".join(f"<figure><img src='{name}' alt='{name}'><figcaption><b>{name}</b>: {html.escape(text)}"
                      "</figcaption></figure>" for name, text in FIGURES.items())
    html_path = out / "compare.html"
    html_path.write_text(f"<!doctype html><meta charset='utf-8'><title>jp-peft compare</title><style>{STYLE}</style>"
                         f"<h1>jp-peft compare</h1>{warn}<h2>Runs: the last stage against base</h2>"
                         f"{_table_html(rows, blanks)}{stage_html}<h2>Figures</h2>{figures}\n", encoding="utf-8")
    return md_path, html_path


def unique_run_dirs(run_dirs: list[str]) -> tuple[list[Path], list[str]]:
    """The run directories once each (the first spelling kept) and a warning per one named again."""
    seen: dict[Path, str] = {}
    kept, warnings = [], []
    for d in run_dirs:
        key = Path(d).resolve()
        if key in seen:
            warnings.append(f"{d}: the same run directory as {seen[key]}; compared once")
            continue
        seen[key] = d
        kept.append(Path(d))
    return kept, warnings


def compare_runs(run_dirs: list[str], output: str) -> dict[str, Any]:
    dirs, warnings = unique_run_dirs(run_dirs)
    runs = [load_run(d) for d in dirs]
    names = [r["name"] for r in runs]
    for run in runs:  # two experiments' runs of one name (runs/a/smoke, runs/b/smoke): named by their parent too
        if names.count(run["name"]) > 1:
            run["name"] = f"{run['dir'].resolve().parent.name}/{run['dir'].name}"
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    diff = config_differences(runs)
    rows = summary_rows(runs, diff)
    stages = stage_rows(runs)
    md, html_path = write_tables(rows, out, stages, warnings)
    plots = write_plots(runs, out, stages)
    (out / "compare.json").write_text(json.dumps(rows, indent=2, default=str) + "\n", encoding="utf-8")
    (out / "compare_stages.json").write_text(json.dumps(stages, indent=2, default=str) + "\n", encoding="utf-8")
    return {"markdown": md, "html": html_path, "plots": plots, "rows": rows, "stages": stages, "warnings": warnings,
            "finite": all(math.isfinite(r["ja_ppl"]) for r in rows)}

"""`jp-peft compare RUN_DIR...`: one table and three plots for a set of finished runs, offline.

Reads each run's own files (spec.json, <stage>/metrics.json, <stage>/train_log.jsonl, eval/results.json):
the config keys that differ between runs, each stage's method and trainable parameters, final
Japanese/English perplexity, gain, forgetting, downstream JA/EN task averages with gain and forgetting
in points against base, throughput, MFU and wall time; train loss against tokens; the JA-vs-EN
trade-off in perplexity and in task averages. A run without downstream results has blank downstream
cells and no line in that plot.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from jp_peft.records import layout as rundir
from jp_peft.evaluation.summary import BASE, downstream_summary
from jp_peft.records.metrics import read_stage_metrics, read_train_log, relative_forgetting, relative_gain, step_rows
from jp_peft.records.layout import MissingRecord, read_json
from jp_peft.spec import TRAINED_STAGES

IGNORED_KEYS = ("name", "group", "output_dir")  # differ by construction, say nothing about the recipe
# downstream columns, in points, of the last trained stage: blank for a run without eval/results.json
DOWNSTREAM_COLUMNS = {"ja_avg": "ja_avg", "en_avg": "en_avg", "ja_gain_pt": "ja_gain", "en_forgetting_pt": "en_forgetting"}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
        return out
    if isinstance(node, list) and node and all(isinstance(v, dict) for v in node):  # the blend: one column per field
        out = {}
        for i, value in enumerate(node):
            out.update(_flatten(value, f"{prefix}[{i}]"))
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
            run["stages"][stage] = {"metrics": read_stage_metrics(metrics).to_dict(), "log": step_rows(rows)}
    if not run["stages"]:
        raise MissingRecord(f"{run_dir}: no finished stage (no <stage>/metrics.json)")
    run["downstream"] = load_downstream(run_dir)
    return run


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
    flat = [_flatten(r["spec"]) for r in runs]
    keys = sorted(set().union(*flat))
    return [k for k in keys if not k.split(".")[-1] in IGNORED_KEYS and "source" not in k and "prefix" not in k
            and len({json.dumps(f.get(k)) for f in flat}) > 1]


def summary_rows(runs: list[dict], diff_keys: list[str]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        flat = _flatten(run["spec"])
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


def write_tables(rows: list[dict], out: Path) -> tuple[Path, Path]:
    headers = list(rows[0])
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    cell = {h: "" if h in DOWNSTREAM_COLUMNS else "n/a" for h in headers}  # no downstream results: blank
    md += ["| " + " | ".join(_fmt(r[h], cell[h]) for h in headers) + " |" for r in rows]
    md_path = out / "compare.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r[h], cell[h]))}</td>" for h in headers) + "</tr>"
                    for r in rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    html_path = out / "compare.html"
    html_path.write_text(f"<!doctype html><meta charset='utf-8'><title>jp-peft compare</title>"
                         f"<table border='1'><tr>{head}</tr>{cells}</table>"
                         f"<p><img src='loss_vs_tokens.png'> <img src='ja_vs_en_ppl.png'> <img src='ja_vs_en_tasks.png'></p>\n", encoding="utf-8")
    return md_path, html_path


def write_plots(runs: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        offset = 0
        for stage, data in run["stages"].items():
            xs = [offset + r["perf/consumed_tokens"] for r in data["log"]]
            ax.plot(xs, [r["train/loss"] for r in data["log"]], label=f"{run['name']} {stage}")
            offset = xs[-1] if xs else offset
    ax.set_xlabel("tokens"), ax.set_ylabel("train loss"), ax.legend(fontsize=7), ax.set_title("train loss vs tokens")
    loss_png = out / "loss_vs_tokens.png"
    fig.tight_layout(), fig.savefig(loss_png, dpi=100), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 5))
    for run in runs:
        stages = list(run["stages"].values())
        points = [(stages[0]["metrics"]["base_val_ppl_ja"], stages[0]["metrics"]["base_val_ppl_en"])]
        points += [(s["metrics"]["val_ppl_ja"], s["metrics"]["val_ppl_en"]) for s in stages]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=run["name"])
        for (x, y), tag in zip(points, ["base", *run["stages"]]):
            ax.annotate(tag, (x, y), fontsize=7)
    ax.set_xlabel("Japanese validation ppl (lower: gain)"), ax.set_ylabel("English validation ppl (higher: forgetting)")
    ax.legend(fontsize=7), ax.set_title("JA gain vs EN forgetting")
    tradeoff_png = out / "ja_vs_en_ppl.png"
    fig.tight_layout(), fig.savefig(tradeoff_png, dpi=100), plt.close(fig)
    return [loss_png, tradeoff_png, plot_task_averages(runs, out, plt)]


def plot_task_averages(runs: list[dict], out: Path, plt) -> Path:
    """JA task average against EN task average, base -> cpt -> sft per run (up and right: better)."""
    fig, ax = plt.subplots(figsize=(6, 5))
    plotted = 0
    for run in runs:
        models = (run["downstream"] or {}).get("models", {})
        points = [(name, m["ja_avg"], m["en_avg"]) for name, m in models.items()
                  if m["ja_avg"] is not None and m["en_avg"] is not None]
        if not points:
            continue
        ax.plot([p[1] for p in points], [p[2] for p in points], marker="o", label=run["name"])
        for name, x, y in points:
            ax.annotate(name, (x, y), fontsize=7)
        plotted += 1
    if not plotted:
        ax.text(0.5, 0.5, "no run has downstream results (eval/results.json)", ha="center", va="center",
                transform=ax.transAxes)
    else:
        ax.legend(fontsize=7)
    ax.set_xlabel("Japanese task average, points (higher: gain)")
    ax.set_ylabel("English task average, points (lower: forgetting)")
    ax.set_title(f"JA gain vs EN forgetting, downstream tasks (from {BASE})")
    path = out / "ja_vs_en_tasks.png"
    fig.tight_layout(), fig.savefig(path, dpi=100), plt.close(fig)
    return path


def compare_runs(run_dirs: list[str], output: str) -> dict[str, Any]:
    runs = [load_run(Path(d)) for d in run_dirs]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    diff = config_differences(runs)
    rows = summary_rows(runs, diff)
    md, html_path = write_tables(rows, out)
    plots = write_plots(runs, out)
    (out / "compare.json").write_text(json.dumps(rows, indent=2, default=str) + "\n", encoding="utf-8")
    return {"markdown": md, "html": html_path, "plots": plots, "rows": rows,
            "finite": all(math.isfinite(r["ja_ppl"]) for r in rows)}

"""The figures of `jp-peft compare` (compare.py builds the runs and their stage rows; this draws them).

Five PNGs: JA and EN validation loss against consumed tokens, train loss per stage, gain and forgetting in
percent of the base perplexity and in task points, and the task averages; beside them figures.json, the
numbers drawn on each (Drawn), so a figure and its numbers cannot differ. Apart from compare.py to keep
each module under ~400 lines: the tables and the figures change for different reasons.
"""

from __future__ import annotations

import json
from pathlib import Path

from jp_peft.evaluation.summary import BASE
from jp_peft.records.metrics import CONSUMED_TOKENS
from jp_peft.spec import TRAINED_STAGES
from jp_peft.spec.stages import BLEND, CHAT, PREFERENCE, stage as stage_row


class Drawn(dict):
    """figure file -> the series drawn on it ({"panel", "label", "x", "y", "xerr", "yerr"}), written beside the
    PNGs as figures.json: the numbers behind each figure, drawn through `series` so the two cannot differ."""

    def series(self, figure: str, ax, label: str, xs, ys, *, xerr=None, yerr=None, panel: str = "", legend=True,
               **style):
        xs, ys = [float(x) for x in xs], [float(y) for y in ys]
        shown = label if legend else f"_{label}"  # matplotlib leaves "_..." out of the legend
        if xerr is None and yerr is None:
            ax.plot(xs, ys, label=shown, **style)
        else:
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, label=shown, capsize=3, **style)
        self.setdefault(figure, []).append({"panel": panel, "label": label, "x": xs, "y": ys,
                                            "xerr": None if xerr is None else [float(e) for e in xerr],
                                            "yerr": None if yerr is None else [float(e) for e in yerr]})


STAGE_STYLE = {"cpt": "-", "sft": "--"}
STAGE_MARKER = {BASE: "o", "cpt": "s", "sft": "^"}


def _including_zero(ax, xs: list[float], ys: list[float]) -> None:
    """Axes that start at zero (the base) and reach every point, with a margin: no autoscaled sliver."""
    for values, setter in ((xs, ax.set_xlim), (ys, ax.set_ylim)):
        low, high = min([0.0, *values]), max([0.0, *values])
        pad = 0.1 * (high - low) or 1.0
        setter(low - (pad if low < 0 else 0.3 * pad), high + pad)
    ax.axhline(0, color="grey", lw=0.8), ax.axvline(0, color="grey", lw=0.8)


def _stage_legend(ax, stages: list[str]) -> None:
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="black", marker=STAGE_MARKER.get(s, "o"), ls="") for s in stages]
    ax.legend(handles, labels + stages, fontsize=7, loc="best")


def plot_validation(runs: list[dict], out: Path, plt, drawn: Drawn) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for color, run in zip(_colors(len(runs)), runs):
        offset = 0.0
        for stage, data in run["stages"].items():
            curve = data["val"]
            xs = [offset + p["tokens"] for p in curve]
            for ax, lang in zip(axes, ("ja", "en")):
                drawn.series("val_loss_vs_tokens.png", ax, f"{run['name']} {stage}", xs, [p[lang] for p in curve],
                             panel=lang, ls=STAGE_STYLE.get(stage, "-"), color=color, marker=".")
            offset = xs[-1]
    for ax, lang in zip(axes, ("Japanese", "English")):
        ax.set_xlabel("consumed tokens (CPT, then SFT)"), ax.set_ylabel(f"{lang} validation loss (nats/token)")
        ax.set_title(f"{lang} validation loss"), ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    return _save(fig, out / "val_loss_vs_tokens.png", plt)


# what a stage's training loss is over, by its data kind (the stage table's): the panels are not comparable
TRAIN_LOSS_OF = {BLEND: "blend", CHAT: "assistant tokens", PREFERENCE: "DPO loss on preference pairs"}


def plot_train_loss(runs: list[dict], out: Path, plt, drawn: Drawn) -> Path:
    stages = [s for s in TRAINED_STAGES if any(s in r["stages"] for r in runs)]
    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for color, run in zip(_colors(len(runs)), runs):
            log = run["stages"].get(stage, {}).get("log", [])
            drawn.series("loss_vs_tokens.png", ax, run["name"], [r[CONSUMED_TOKENS] for r in log],
                         [r["train/loss"] for r in log], panel=stage, color=color)
        what = TRAIN_LOSS_OF[stage_row(stage).data_kind]
        ax.set_xlabel(f"{stage} tokens"), ax.set_ylabel(f"{stage} train loss ({what})"), ax.set_title(f"{stage} train loss")
        ax.grid(alpha=0.3), ax.legend(fontsize=7)
    return _save(fig, out / "loss_vs_tokens.png", plt)


def plot_gain_forgetting(stages: list[dict], out: Path, plt, drawn: Drawn, *, tasks: bool) -> Path:
    """JA gain (x) against EN forgetting (y) from base, per run: percent of perplexity, or task points."""
    x_key, y_key = ("ja_gain_pt", "en_forgetting_pt") if tasks else ("ja_gain_%", "en_forgetting_%")
    figure = "gain_forgetting_tasks.png" if tasks else "gain_forgetting_ppl.png"
    fig, ax = plt.subplots(figsize=(6.5, 5))
    names = list(dict.fromkeys(r["run"] for r in stages))
    xs, ys, plotted = [], [], 0
    for color, name in zip(_colors(len(names)), names):
        rows = [r for r in stages if r["run"] == name and r[x_key] is not None and r[y_key] is not None]
        if not rows:
            continue
        px = [0.0 if r["stage"] == BASE else r[x_key] for r in rows]
        py = [0.0 if r["stage"] == BASE else r[y_key] for r in rows]
        ax.plot(px, py, "-", color=color, label=name, alpha=0.8)
        for r, x, y in zip(rows, px, py):
            xerr = (r.get("ja_gain_pt_stderr") or 0.0) if tasks and r["stage"] != BASE else None
            yerr = (r.get("en_forgetting_pt_stderr") or 0.0) if tasks and r["stage"] != BASE else None
            drawn.series(figure, ax, f"{name} {r['stage']}", [x], [y], xerr=None if xerr is None else [xerr],
                         yerr=None if yerr is None else [yerr], color=color, marker=STAGE_MARKER.get(r["stage"], "o"),
                         ms=7, ls="", legend=False)
            xs += [x - (xerr or 0), x + (xerr or 0)]
            ys += [y - (yerr or 0), y + (yerr or 0)]
        plotted += 1
    unit = "points" if tasks else "% of base perplexity"
    ax.set_xlabel(f"Japanese gain, {unit} (right: better)"), ax.set_ylabel(f"English forgetting, {unit} (up: worse)")
    ax.set_title("JA gain vs EN forgetting, " + ("downstream task averages" if tasks else "validation perplexity"))
    _including_zero(ax, xs, ys)
    if plotted:
        _stage_legend(ax, [s for s in (BASE, *TRAINED_STAGES) if any(r["stage"] == s for r in stages)])
    else:
        ax.text(0.5, 0.5, "no run has downstream results (eval/results.json)", ha="center", va="center",
                transform=ax.transAxes)
    ax.grid(alpha=0.3)
    return _save(fig, out / figure, plt)


def plot_task_averages(stages: list[dict], out: Path, plt, drawn: Drawn) -> Path:
    """Grouped bars from zero: per run, a bar per model (base, cpt, sft), error bars one stderr."""
    rows = [r for r in stages if r["ja_avg"] is not None or r["en_avg"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(dict.fromkeys(r["run"] for r in rows))
    models = [s for s in (BASE, *TRAINED_STAGES) if any(r["stage"] == s for r in rows)]
    width = 0.8 / max(len(models), 1)
    for ax, lang in zip(axes, ("ja", "en")):
        for k, (model, color) in enumerate(zip(models, _colors(len(models), "Set2"))):
            found = {r["run"]: r for r in rows if r["stage"] == model}
            xs = [i + (k - (len(models) - 1) / 2) * width for i, n in enumerate(names) if n in found]
            vals = [found[n][f"{lang}_avg"] or 0.0 for n in names if n in found]
            errs = [found[n][f"{lang}_avg_stderr"] or 0.0 for n in names if n in found]
            ax.bar(xs, vals, width, yerr=errs, capsize=3, color=color, label=model)
            drawn.setdefault("task_averages.png", []).append({"panel": lang, "label": model, "x": xs, "y": vals,
                                                              "xerr": None, "yerr": errs})
        ax.set_xticks(range(len(names)), names, fontsize=7, rotation=15)
        ax.set_ylim(bottom=0), ax.set_ylabel(f"{lang.upper()} task average, points")
        ax.set_title(f"{'Japanese' if lang == 'ja' else 'English'} task average (± stderr)"), ax.grid(axis="y", alpha=0.3)
        if rows:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no downstream results", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, out / "task_averages.png", plt)


def _colors(n: int, cmap: str = "tab10") -> list:
    import matplotlib

    colors = matplotlib.colormaps[cmap].colors
    return [colors[i % len(colors)] for i in range(n)]


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout(), fig.savefig(path, dpi=100), plt.close(fig)
    return path


def write_plots(runs: list[dict], out: Path, stages: list[dict]) -> list[Path]:
    """The five figures of `runs` (compare.load_run) and their stage rows (compare.stage_rows), and figures.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = Drawn()
    paths = [plot_validation(runs, out, plt, drawn), plot_train_loss(runs, out, plt, drawn),
             plot_gain_forgetting(stages, out, plt, drawn, tasks=False),
             plot_gain_forgetting(stages, out, plt, drawn, tasks=True), plot_task_averages(stages, out, plt, drawn)]
    (out / "figures.json").write_text(json.dumps(drawn, indent=1) + "\n", encoding="utf-8")
    return paths

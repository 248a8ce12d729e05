"""The summary an experiment ends with: the table printed at the end and written as summary.json."""

from __future__ import annotations

from jp_peft.records.metrics import relative_forgetting, relative_gain


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

"""The eval stage's W&B run: a table of task scores per model (base, cpt, sft), the greedy samples as a
table, and the averages, gain and forgetting as summary metrics. Offline unless a key is set; nothing when
W&B is off (--no-wandb)."""

from __future__ import annotations

from typing import Any

from jp_peft.spec import ExperimentSpec

TABLE_COLUMNS = ["task", "lang", "metric", "value", "stderr", "n", "num_fewshot", "config_sha256"]
SUMMARY_KEYS = ("ja_avg", "en_avg", "ja_gain", "en_forgetting")


def table_key(model: str) -> str:
    """The W&B key of a model's task table (base, cpt, sft)."""
    return f"eval/{model}"


def summary_key(model: str, key: str) -> str:
    """The W&B summary key of one of a model's SUMMARY_KEYS (points; gain and forgetting against base)."""
    return f"eval/{model}/{key}"


def log_eval(exp: ExperimentSpec, results: dict[str, Any] | None, summary: dict[str, Any] | None,
             samples: list[dict[str, Any]] | None) -> None:
    """`results`: eval/results.json's record; `summary`: its downstream_summary; `samples`: samples.jsonl rows."""
    from jp_peft.training.wandb_run import wandb_stage_run

    if summary is None and samples is None:
        return
    run = wandb_stage_run(exp, "eval")
    if run is None:
        return
    import wandb

    try:
        if results is not None and summary is not None:
            for model, record in results["models"].items():
                rows = [[task, t["lang"], t["metric"], t["value"], t["stderr"], t["n"], t["num_fewshot"],
                         t["config_sha256"]] for task, t in record["tasks"].items()]
                run.log({table_key(model): wandb.Table(columns=TABLE_COLUMNS, data=rows)})
            run.summary.update({summary_key(model, key): row[key] for model, row in summary["models"].items()
                                for key in SUMMARY_KEYS if row[key] is not None})
            run.summary.update({"eval/lm_eval_version": next(iter(results["models"].values()))["lm_eval_version"]})
        if samples:
            models = [k for k in samples[0] if k not in ("id", "prompt")]
            run.log({"eval/samples": wandb.Table(columns=["id", "prompt", *models],
                                                 data=[[r["id"], r["prompt"], *(r[m] for m in models)] for r in samples])})
    finally:
        run.finish()

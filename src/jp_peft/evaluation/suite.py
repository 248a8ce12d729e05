"""The experiment's downstream evaluation: the spec's `eval` section checked before anything runs, then
the base model and every trained stage's exported model scored on the same tasks (eval/results.json),
and their greedy answers to the bundled prompts (eval/samples.jsonl).

Called by the eval stage (jp_peft.run.entry) and, for the up-front check, by the launcher.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jp_peft.records import layout as rundir
from jp_peft.records.export_record import ExportRecord, stage_result_hf
from jp_peft.evaluation.summary import BASE, downstream_summary, task_score
from jp_peft.spec import ExperimentSpec, SpecError

SUITE_FORMAT = 1
DATA_DIR_OPTION = "eval.data_dir=DATA_DIR"


def suite_problems(exp: ExperimentSpec) -> list[str]:
    """What keeps the eval stage from scoring its tasks, one line each, starting with the spec field (an
    unknown task, a task without its data and how to provide it); [] when nothing does. Loads no model."""
    from jp_peft.evaluation.tasks import MissingTaskDataError, UnknownTaskError, check_available

    ev = exp.eval
    if "eval" not in exp.stages or not ev.downstream:
        return []
    if ev.data_dir is not None and not Path(ev.data_dir).is_dir():
        return [f"eval.data_dir: {ev.data_dir} is not a directory"]
    absent = [p for p in ev.include_path if not Path(p).is_dir()]
    if absent:
        return [f"eval.include_path: {', '.join(absent)} is not a directory"]
    problems, names, unfetched = [], {}, {}
    for field in ("tasks_ja", "tasks_en"):
        requested = getattr(ev, field)
        if not requested:
            names[field] = []
            continue
        try:
            names[field] = [s.name for s in check_available(
                requested, ev.data_dir, num_fewshot=ev.num_fewshot, include_path=ev.include_path,
                data_dir_option=DATA_DIR_OPTION)]
        except UnknownTaskError as exc:
            problems.append(f"eval.{field}: {str(exc).replace('--include-path', 'eval.include_path')}")
        except MissingTaskDataError as exc:
            fetchable = set(exc.fetchable)
            problems += [f"eval.{field}: {line}" for line in exc.lines if line.split(":")[0] not in fetchable]
            unfetched.update({name: field for name in exc.fetchable})
    if unfetched:
        problems.append(missing_data_line(unfetched, ev.data_dir))
    both = sorted(set(names.get("tasks_ja", [])) & set(names.get("tasks_en", [])))
    if both:
        problems.append(f"eval.tasks_en: {', '.join(both)} also in eval.tasks_ja (a task counts for one language)")
    return problems


def missing_data_line(unfetched: dict[str, str], data_dir: str | None) -> str:
    """One line for every Hub task without its data (task -> its field), naming the command that writes them:
    the launch of a preset whose data was never fetched says this once, not once per task."""
    from jp_peft.evaluation.fetch_data import production_tasks
    from jp_peft.evaluation.tasks import resolve_tasks

    fields = ", ".join(f"eval.{f}" for f in dict.fromkeys(unfetched.values()))
    default = [s.name for s in resolve_tasks(production_tasks())]
    tasks = "" if sorted(unfetched) == sorted(default) else f" --tasks {','.join(unfetched)}"
    if data_dir is None:
        return (f"{fields}: {', '.join(unfetched)} read Hub data sets, never downloaded at run time, and eval.data_dir "
                f"is not set: run `jp-peft eval fetch-data DATA_DIR{tasks}` on a machine with network, then pass "
                "eval.data_dir=DATA_DIR")
    return (f"{fields}: eval.data_dir={data_dir} lacks the files of {', '.join(unfetched)}: run "
            f"`jp-peft eval fetch-data {data_dir}{tasks}` on a machine with network (`jp-peft eval --data-dir` "
            "names each file)")


def check_suite(exp: ExperimentSpec) -> None:
    problems = suite_problems(exp)
    if problems:
        raise SpecError("\n".join(problems))


def suite_tasks(exp: ExperimentSpec) -> tuple[list[str], list[str]]:
    """The Japanese and English task names, sets expanded, in request order."""
    from jp_peft.evaluation.tasks import resolve_tasks

    def names(tasks: tuple[str, ...]) -> list[str]:
        return [s.name for s in resolve_tasks(tasks, exp.eval.include_path)] if tasks else []

    return names(exp.eval.tasks_ja), names(exp.eval.tasks_en)


def models_to_score(exp: ExperimentSpec) -> list[tuple[str, str]]:
    """(name, Hugging Face model dir): base, then each trained stage of the spec (its merged export)."""
    models = [(BASE, rundir.base_model_dir(exp))]
    return models + [(stage, stage_result_hf(exp, stage)) for stage in exp.trained_stages]


def _adapter_of(exp: ExperimentSpec, stage: str) -> dict[str, Any]:
    """The adapter form of a stage's result, recorded beside the merged model that was scored."""
    record = rundir.export_record(exp, stage)
    if not record.exists():
        return {"adapter": str(rundir.hf_adapter(exp, stage)), "adapter_base": None}
    exported = ExportRecord.read(record, f"eval of {stage}")
    return {"adapter": exported.hf_adapter, "adapter_base": exported.adapter_base}


def run_suite(exp: ExperimentSpec, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Score every model, write eval/results.json and eval/samples.jsonl, log them to W&B; returns the
    downstream summary (None when the spec asks for no task)."""
    from jp_peft.evaluation.harness import evaluate, write_results
    from jp_peft.evaluation.wandb_log import log_eval

    check_suite(exp)
    ev = exp.eval
    models = models_to_score(exp)  # fails here, before any scoring, when an export is missing
    results, summary = None, None
    if ev.downstream:
        tasks_ja, tasks_en = suite_tasks(exp)
        results = {"format": SUITE_FORMAT, "experiment": exp.name, "eval": exp.to_dict()["eval"],
                   "tasks_ja": tasks_ja, "tasks_en": tasks_en, "models": {}}
        for name, model_dir in models:
            record = evaluate(model_dir, None, [*tasks_ja, *tasks_en], num_fewshot=ev.num_fewshot, limit=ev.limit,
                              batch_size=ev.batch_size, data_dir=ev.data_dir, include_path=ev.include_path,
                              seed=ev.seed)
            for task, entry in record["tasks"].items():
                entry.update(lang="ja" if task in tasks_ja else "en", **task_score(entry))
            if name != BASE:
                record.update(_adapter_of(exp, name))
            results["models"][name] = record
            row = downstream_summary({**results, "models": {name: record}})["models"][name]
            log(f"eval: {name}: JA avg {_show(row['ja_avg'])}, EN avg {_show(row['en_avg'])} "
                f"({len(record['tasks'])} tasks, {record['wall_seconds']:.1f} s)")
        write_results(rundir.eval_results(exp), results)
        summary = downstream_summary(results)
    samples = _generate(exp, models, log) if ev.generation else None
    log_eval(exp, results, summary, samples)
    return summary


def _show(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _generate(exp: ExperimentSpec, models: list[tuple[str, str]], log) -> list[dict[str, Any]]:
    """One row per prompt: {"id", "prompt", <model>: answer, ...}, written to eval/samples.jsonl."""
    from jp_peft.evaluation.generation import generate_samples, load_prompts, write_samples

    started = time.perf_counter()
    rows = [{"id": p["id"], "prompt": p["prompt"]} for p in load_prompts()]
    for name, model_dir in models:
        for row, answer in zip(rows, generate_samples(model_dir, max_new_tokens=exp.eval.max_new_tokens)):
            row[name] = answer["output"]
    write_samples(rundir.eval_samples(exp), rows)
    log(f"eval: greedy answers of {', '.join(n for n, _ in models)} to {len(rows)} prompts in "
        f"{time.perf_counter() - started:.1f} s -> {rundir.eval_samples(exp)}")
    return rows

"""Downstream evaluation of a Hugging Face model (optionally with a PEFT adapter) through
lm-evaluation-harness, offline and seeded, into one results record (results.json).

The record, per task: each metric's value and stderr, n (items scored), n_total, num_fewshot, the
task version, a sha256 of the task config lm-eval ran (data file paths replaced by the files'
sha256, so the same task on the same data hashes the same wherever it is rendered) and of each
data file; at the top: the model and adapter, lm-eval's version, device, dtype, seed and limits.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import inspect
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jp_peft.evaluation.tasks import PreparedTasks, check_available, prepared_tasks
from jp_peft.resources import sha256_file
from jp_peft.records.layout import write_json

RESULTS_FORMAT = 1
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class EvalInputError(ValueError):
    """A model or adapter directory that cannot be evaluated (named in the message)."""


def resolve_device(device: str | None) -> str:
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """float32 on CPU (exact, and bf16 matmuls are slow there), bfloat16 on GPU."""
    return "float32" if device == "cpu" else "bfloat16"


def check_model_dirs(model_dir: str | Path, adapter_dir: str | Path | None = None) -> tuple[Path, Path | None]:
    """Both directories exist and hold what transformers / peft read; returns them absolute."""
    model = Path(model_dir).expanduser().resolve()
    if not (model / "config.json").is_file():
        raise EvalInputError(f"--model {model_dir}: no Hugging Face model there (no config.json)")
    adapter = None
    if adapter_dir is not None:
        adapter = Path(adapter_dir).expanduser().resolve()
        if not (adapter / "adapter_config.json").is_file():
            raise EvalInputError(f"--adapter {adapter_dir}: no PEFT adapter there (no adapter_config.json)")
    return model, adapter


@contextmanager
def quiet_libraries(enabled: bool = True) -> Iterator[None]:
    """lm-eval's INFO/WARNING chatter, transformers' warnings and datasets' progress bars off for the
    duration; errors still show."""
    if not enabled:
        yield
        return
    import datasets
    import transformers

    lm_logger = logging.getLogger("lm_eval")
    old_level, old_tf = lm_logger.level, transformers.logging.get_verbosity()
    bars = datasets.is_progress_bar_enabled()
    lm_logger.setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        lm_logger.setLevel(old_level)
        transformers.logging.set_verbosity(old_tf)
        if bars:
            datasets.enable_progress_bars()


def _stable(value: Any) -> Any:
    if callable(value):
        try:
            return inspect.getsource(value)
        except (OSError, TypeError):
            return getattr(value, "__qualname__", repr(type(value)))
    return str(value)


def config_sha256(config: dict[str, Any], data_hashes: dict[str, str]) -> str:
    """sha256 of lm-eval's task config, independent of where it was rendered: data file paths become
    the files' sha256, the datasets cache and lm-eval's run metadata (model args, YAML path) go."""
    config = json.loads(json.dumps(config, default=_stable))
    kwargs = dict(config.get("dataset_kwargs") or {})
    kwargs.pop("cache_dir", None)
    if "data_files" in kwargs:
        kwargs["data_files"] = data_hashes
    config["dataset_kwargs"] = kwargs
    config["metadata"] = {"version": (config.get("metadata") or {}).get("version")}
    canonical = json.dumps(config, sort_keys=True, ensure_ascii=False, default=_stable)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _metrics(task_results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """lm-eval's {"acc,none": v, "acc_stderr,none": s} -> {"acc": {"value": v, "stderr": s}};
    a filter other than "none" stays in the name ("exact_match,whitespaces")."""
    out = {}
    for key, value in task_results.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filter_name = key.split(",", 1)
        stderr = task_results.get(f"{metric}_stderr,{filter_name}")
        name = metric if filter_name == "none" else key
        out[name] = {"value": float(value) if value is not None else None,
                     "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    return out


def _sample_rows(samples: list[dict[str, Any]], metric_names: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for sample in samples:
        rows.append({"doc_id": sample["doc_id"], "target": sample["target"],
                     "arguments": [list(a) for a in sample["arguments"]],
                     "responses": json.loads(json.dumps(sample["filtered_resps"], default=str)),
                     **{m: sample[m] for m in metric_names if m in sample}})
    return rows


def _task_record(name: str, raw: dict[str, Any], prepared: PreparedTasks) -> dict[str, Any]:
    data_hashes = {split: sha256_file(path) for split, path in prepared.data_files.get(name, {}).items()}
    n_samples = raw["n-samples"].get(name, {})
    return {
        "source": prepared.sources[name].origin,
        "metrics": _metrics(raw["results"][name]),
        "n": n_samples.get("effective"),
        "n_total": n_samples.get("original"),
        "num_fewshot": raw["n-shot"].get(name),
        "version": raw["versions"].get(name),
        "higher_is_better": raw["higher_is_better"].get(name, {}),
        "config_sha256": config_sha256(raw["configs"][name], data_hashes),
        "data_sha256": data_hashes,
    }


def evaluate(model_dir: str | Path, adapter_dir: str | Path | None = None, tasks: str | Sequence[str] = ("jpeft",), *,
             num_fewshot: int | None = None, limit: int | float | None = None, batch_size: int = 8,
             data_dir: str | Path | None = None, include_path: Sequence[str | Path] = (), device: str | None = None,
             dtype: str | None = None, seed: int = 1234, bootstrap_iters: int = 1000, samples: bool = False,
             quiet: bool = True) -> dict[str, Any]:
    """Score `model_dir` (+ `adapter_dir`, loaded unmerged with peft) on `tasks` with lm-eval's `hf`
    model. Inputs and task data are checked before the model loads (EvalInputError, UnknownTaskError,
    MissingTaskDataError). `samples=True` adds per-item requests and responses under "samples"."""
    model, adapter = check_model_dirs(model_dir, adapter_dir)
    check_available(tasks, data_dir, num_fewshot=num_fewshot, include_path=include_path)
    for key, value in OFFLINE_ENV.items():  # nothing here downloads; fail fast instead of waiting on a network
        os.environ.setdefault(key, value)
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    started = time.perf_counter()
    with quiet_libraries(quiet), prepared_tasks(tasks, data_dir, num_fewshot=num_fewshot,
                                                include_path=include_path) as prepared:
        import lm_eval
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        model_args: dict[str, Any] = {"pretrained": str(model), "dtype": dtype}
        if adapter is not None:
            model_args["peft"] = str(adapter)
        raw = simple_evaluate(
            model="hf", model_args=model_args, tasks=prepared.names, num_fewshot=num_fewshot,
            batch_size=batch_size, device=device, limit=limit, bootstrap_iters=bootstrap_iters,
            log_samples=samples, task_manager=TaskManager(include_path=[str(p) for p in prepared.include_path],
                                                          include_defaults=False),
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        record: dict[str, Any] = {
            "format": RESULTS_FORMAT,
            "model": str(model),
            "adapter": str(adapter) if adapter else None,
            "lm_eval_version": lm_eval.__version__,
            "device": device,
            "dtype": dtype,
            "batch_size": batch_size,
            "num_fewshot": num_fewshot,
            "limit": limit,
            "seed": seed,
            "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": None,
            "tasks": {name: _task_record(name, raw, prepared) for name in prepared.names},
        }
        if samples:
            record["samples"] = {name: _sample_rows(raw["samples"][name], list(record["tasks"][name]["metrics"]))
                                 for name in prepared.names}
    record["wall_seconds"] = round(time.perf_counter() - started, 2)
    return record


def write_results(path: str | Path, record: dict[str, Any]) -> Path:
    """Write the record as JSON (atomically, via rundir.write_json)."""
    path = Path(path)
    write_json(path, record)
    return path


def read_results(path: str | Path) -> dict[str, Any]:
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    if record.get("format") != RESULTS_FORMAT or "tasks" not in record:
        raise ValueError(f"{path}: not a jp-peft eval results file (format {RESULTS_FORMAT})")
    return record


def format_table(record: dict[str, Any]) -> str:
    """One row per task and metric, as printed by `jp-peft eval`."""
    rows = [("task", "metric", "value", "stderr", "n", "shots")]
    for name, task in record["tasks"].items():
        for metric, m in task["metrics"].items():
            stderr = "" if m["stderr"] is None else f"{m['stderr']:.4f}"
            rows.append((name, metric, f"{m['value']:.4f}", stderr, str(task["n"]), str(task["num_fewshot"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    what = record["model"] + (f" + adapter {record['adapter']}" if record["adapter"] else "")
    return "\n".join([f"{what} ({record['device']}, {record['dtype']}, lm-eval {record['lm_eval_version']})", *lines])

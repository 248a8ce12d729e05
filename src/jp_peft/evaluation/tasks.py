"""Which evaluation tasks exist, where their data is, and the include directory lm-eval reads them from.

Three kinds of task, resolved by name:

- bundled: `jpeft_jcqa`, `jpeft_jnli`, `jpeft_marc`, `jpeft_en_mc`, and the continuation tasks
  `jpeft_ja_cont`, `jpeft_en_cont` built from held-out bundled text (`continuation_tasks.py`) (package
  data under `jp_peft/evaluation/tasks/`, see its README.md). Always available.
- production: lm-eval's `japanese_leaderboard` tasks and an English set (`PRODUCTION_TASKS`). Their
  data sets live on the Hugging Face Hub, which this code never downloads from: they are read from a
  local data directory,

      DATA_DIR/<task>/<split>.jsonl       (or .json, .parquet, .csv; one format per task)

  holding the Hub data set's rows unchanged (same columns), one file per split the task reads: the
  evaluated split (`test_split`, else `validation_split` of lm-eval's YAML) and, when the task runs
  few-shot, the few-shot pool (`fewshot_split`, else `training_split`, else `validation_split`).
  `jp-peft eval fetch-data DATA_DIR` (`fetch_data.py`) writes exactly that on a machine with network.
- your own: YAMLs in an include directory (`--include-path`). Local data (`data_files` that exist)
  is used as is; a Hub data set is read from DATA_DIR like a production task.

`check_available` says which requested task has no data before anything loads a model;
`prepared_tasks` renders everything into a temporary include directory with absolute `data_files`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from jp_peft.evaluation.manifest import ManifestError, changed_files

BUNDLED_TASKS = ("jpeft_jcqa", "jpeft_jnli", "jpeft_marc", "jpeft_en_mc", "jpeft_ja_cont", "jpeft_en_cont")
JA_LEADERBOARD_MC = ("ja_leaderboard_jcommonsenseqa", "ja_leaderboard_jnli", "ja_leaderboard_marc_ja",
                     "ja_leaderboard_xwinograd")
JA_LEADERBOARD_GEN = ("ja_leaderboard_jaqket_v2", "ja_leaderboard_jsquad", "ja_leaderboard_mgsm",
                      "ja_leaderboard_xlsum")
ENGLISH_TASKS = ("hellaswag", "arc_easy", "xwinograd_en")
# Names that expand to several tasks. Generation tasks are opt-in: they are slow and need fugashi etc.
TASK_SETS = {"jpeft": BUNDLED_TASKS, "ja_leaderboard": JA_LEADERBOARD_MC, "ja_leaderboard_gen": JA_LEADERBOARD_GEN,
             "en": ENGLISH_TASKS}
# lm-eval's YAML of each production task, relative to the lm_eval.tasks package.
PRODUCTION_TASKS = {
    **{name: f"japanese_leaderboard/{name}.yaml" for name in JA_LEADERBOARD_MC + JA_LEADERBOARD_GEN},
    "hellaswag": "hellaswag/hellaswag.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "xwinograd_en": "xwinograd/xwinograd_en.yaml",
}
DATA_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}  # suffix -> datasets builder
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


class UnknownTaskError(ValueError):
    """A requested name is no bundled, production, --include-path task or task set."""


class MissingTaskDataError(RuntimeError):
    """Requested tasks whose data is not here; one line per task saying how to provide it. `fetchable`: the
    tasks among them whose missing files `jp-peft eval fetch-data` writes (the launcher's one-line refusal)."""

    def __init__(self, lines: Sequence[str], fetchable: Sequence[str] = ()):
        self.lines = list(lines)
        self.fetchable = list(fetchable)
        super().__init__("\n".join(self.lines))


@dataclass(frozen=True)
class TaskSource:
    name: str
    origin: str  # "bundled", "production" or "include"
    config: dict[str, Any]  # the task's YAML, includes merged, !function left unresolved
    yaml_path: Path | None = None  # None for bundled tasks (package data, maybe not a file)


@dataclass
class PreparedTasks:
    """What lm-eval needs: include directories, task names, and the data files each task reads."""

    include_path: list[Path]
    names: list[str]
    sources: dict[str, TaskSource]
    data_files: dict[str, dict[str, Path]] = field(default_factory=dict)  # task -> split -> file


def bundled_file(*parts: str):
    """A bundled evaluation file (importlib.resources Traversable), e.g. bundled_file("prompts", "x.jsonl")."""
    return resources.files("jp_peft.evaluation").joinpath("tasks", *parts)


def _lm_eval_tasks_dir() -> Path:
    return Path(str(resources.files("lm_eval.tasks")))


def _load_task_yaml(path: Path) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own include / !function semantics

    return load_yaml(path, resolve_func=False, recursive=True)


def _split_names(requested: str | Sequence[str]) -> list[str]:
    items = requested.split(",") if isinstance(requested, str) else [p for r in requested for p in r.split(",")]
    names: list[str] = []
    for item in (i.strip() for i in items):
        for name in TASK_SETS.get(item, (item,)):
            if name and name not in names:
                names.append(name)
    return names


def _include_tasks(include_path: Sequence[str | Path]) -> dict[str, Path]:
    from lm_eval.tasks._index import Kind, TaskIndex

    found: dict[str, Path] = {}
    for root in include_path:
        root = Path(root)
        if not root.is_dir():
            raise UnknownTaskError(f"--include-path {root}: not a directory")
        for name, entry in TaskIndex.build([root]).items():
            if entry.kind in (Kind.TASK, Kind.PY_TASK) and entry.yaml_path is not None:
                found[name] = entry.yaml_path
    return found


def resolve_tasks(requested: str | Sequence[str], include_path: Sequence[str | Path] = ()) -> list[TaskSource]:
    """Task names (comma lists and set names `jpeft`, `ja_leaderboard`, `ja_leaderboard_gen`, `en`
    allowed) -> their sources, in request order. --include-path tasks win over names defined here."""
    names = _split_names(requested)
    if not names:
        raise UnknownTaskError("no task requested")
    included = _include_tasks(include_path) if include_path else {}
    sources = []
    for name in names:
        if name in included:
            sources.append(TaskSource(name, "include", _load_task_yaml(included[name]), included[name]))
        elif name in BUNDLED_TASKS:
            config = yaml.safe_load(bundled_file(name, f"{name}.yaml").read_text(encoding="utf-8"))
            sources.append(TaskSource(name, "bundled", config))
        elif name in PRODUCTION_TASKS:
            path = _lm_eval_tasks_dir() / PRODUCTION_TASKS[name]
            sources.append(TaskSource(name, "production", _load_task_yaml(path), path))
        elif name == "japanese_leaderboard":
            raise UnknownTaskError("japanese_leaderboard: lm-eval's group mixes multiple-choice and generation "
                                   "tasks; ask for ja_leaderboard (multiple choice) and/or ja_leaderboard_gen")
        else:
            known = ", ".join([*TASK_SETS, *BUNDLED_TASKS, *PRODUCTION_TASKS])
            raise UnknownTaskError(f"unknown task {name!r}: not bundled, not a production task and not in "
                                   f"--include-path (known: {known}; for another lm-eval task put a YAML with "
                                   f"`include: <lm-eval YAML path>` in an --include-path directory)")
    return sources


def effective_num_fewshot(config: dict[str, Any], num_fewshot: int | None) -> int:
    """lm-eval's rule: a YAML num_fewshot of 0 is never overridden; otherwise the request wins."""
    if config.get("num_fewshot") == 0:
        return 0
    if num_fewshot is not None:
        return num_fewshot
    return config.get("num_fewshot") or 0


def needed_splits(config: dict[str, Any], num_fewshot: int | None) -> dict[str, str]:
    """split -> what it is for: the evaluated split, and the few-shot pool when the task runs few-shot."""
    evaluated = config.get("test_split") or config.get("validation_split")
    needed = {evaluated: "evaluated"} if evaluated else {}
    shots = effective_num_fewshot(config, num_fewshot)
    if shots:
        pool = ((config.get("fewshot_config") or {}).get("split") or config.get("fewshot_split")
                or config.get("training_split") or config.get("validation_split"))
        if pool:
            needed.setdefault(pool, f"{shots}-shot pool")
    return needed


def _hub_dataset(config: dict[str, Any]) -> str | None:
    """The Hub data set a config reads (None when its data is local)."""
    path = config.get("dataset_path")
    if config.get("custom_dataset") or path is None or path in LOCAL_BUILDERS or Path(path).is_dir():
        return None
    return path if not config.get("dataset_name") else f"{path} ({config['dataset_name']})"


def _find_split_files(task_dir: Path, splits: Sequence[str]) -> tuple[dict[str, Path], list[str]]:
    found, missing = {}, []
    for split in splits:
        candidates = [task_dir / f"{split}{suffix}" for suffix in DATA_FORMATS]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            missing.append(split)
        else:
            found[split] = hit
    return found, missing


def _local_data_files(config: dict[str, Any]) -> dict[str, str]:
    """An include-path YAML's own data_files, by split ("test", or "test.0", "test.1" for lists)."""
    files = ((config.get("dataset_kwargs") or {}).get("data_files")) or {}
    if not isinstance(files, dict):
        files = {"data": files}
    out = {}
    for split, value in files.items():
        if isinstance(value, str):
            out[split] = value
        else:
            out.update({f"{split}.{i}": v for i, v in enumerate(value)})
    return out


def _locate_data(source: TaskSource, data_dir: Path | None, num_fewshot: int | None,
                 data_dir_option: str = "--data-dir DATA_DIR") -> tuple[str | None, dict, bool]:
    """(None, split files, False) when the task can run; (one line saying what to provide, {}, fetchable)
    otherwise, fetchable when `jp-peft eval fetch-data` would provide what is missing (a Hub task's files).
    `data_dir_option` is how the caller's user sets the data directory (a flag, or a spec field)."""
    config = source.config
    if source.origin == "bundled":
        return None, {}, False
    hub = _hub_dataset(config)
    if hub is None:  # an include-path YAML on local data: the files must exist (lm-eval resolves against cwd)
        absent = [f for f in _local_data_files(config).values() if not Path(f).exists()]
        if absent:
            return f"{source.name}: data_files not found: {', '.join(absent)} (from {source.yaml_path})", {}, False
        return None, {}, False
    splits = needed_splits(config, num_fewshot)
    if not splits:
        return f"{source.name}: its YAML names neither test_split nor validation_split", {}, False
    wanted = " and ".join(f"{s}.jsonl ({why})" for s, why in splits.items())
    how = f"on a machine with network, `jp-peft eval fetch-data DATA_DIR --tasks {source.name}` writes them"
    if data_dir is None:
        return (f"{source.name}: needs Hub data set {hub}, which is not bundled and is not downloaded here; "
                f"pass {data_dir_option} holding {source.name}/{wanted}; {how}"), {}, source.origin == "production"
    task_dir = Path(data_dir) / source.name
    found, missing = _find_split_files(task_dir, list(splits))
    if missing:
        what = " and ".join(f"{s} ({splits[s]})" for s in missing)
        return (f"{source.name}: no {what} in {task_dir}/ (expects <split>.jsonl, .json, .parquet or .csv with the "
                f"rows of Hub data set {hub}); {how}"), {}, source.origin == "production"
    formats = {DATA_FORMATS[p.suffix] for p in found.values()}
    if len(formats) > 1:
        return f"{source.name}: mixed file formats in {task_dir}/ ({', '.join(p.name for p in found.values())})", {}, False
    try:
        changed = changed_files(Path(data_dir), found.values())
    except ManifestError as exc:
        return f"{source.name}: {exc}", {}, False
    if changed:  # fetched, then edited or replaced: its scores would not be the fetched data's
        return (f"{source.name}: {'; '.join(changed)}: restore it, or fetch again with `jp-peft eval fetch-data "
                f"{data_dir} --tasks {source.name} --overwrite` on a machine with network"), {}, False
    return None, found, False


def check_available(tasks: str | Sequence[str], data_dir: str | Path | None = None, *,
                    num_fewshot: int | None = None, include_path: Sequence[str | Path] = (),
                    data_dir_option: str = "--data-dir DATA_DIR") -> list[TaskSource]:
    """Resolve `tasks` and make sure each has its data, without loading any model or data set.
    Raises UnknownTaskError, or MissingTaskDataError with one line per task that has no data."""
    sources = resolve_tasks(tasks, include_path)
    where = Path(data_dir) if data_dir else None
    located = {s.name: _locate_data(s, where, num_fewshot, data_dir_option) for s in sources}
    lines = [line for line, _, _ in located.values() if line]
    if lines:
        raise MissingTaskDataError(lines, fetchable=[name for name, (line, _, fetch) in located.items() if line and fetch])
    return sources


def _write_yaml(path: Path, config: dict[str, Any], header: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {header}\n" + yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")


def _render_bundled(source: TaskSource, dest: Path, cache_dir: Path) -> dict[str, Path]:
    """Copy the task's data next to its YAML and point data_files there, absolutely."""
    task_dir = dest / source.name
    task_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(source.config))  # deep copy
    files = {}
    for split, rel in config["dataset_kwargs"]["data_files"].items():
        target = task_dir / rel
        target.write_bytes(bundled_file(source.name, rel).read_bytes())
        files[split] = target.resolve()
    config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": {s: str(p) for s, p in files.items()},
                                "cache_dir": str(cache_dir)}
    _write_yaml(task_dir / f"{source.name}.yaml", config,
                f"rendered by jp-peft from jp_peft/evaluation/tasks/{source.name}/{source.name}.yaml")
    return files


def _render_local_override(source: TaskSource, files: dict[str, Path], dest: Path, cache_dir: Path) -> None:
    """A YAML that includes the task's own and reads its data from the files found in DATA_DIR."""
    override: dict[str, Any] = {
        "include": str(source.yaml_path),
        "task": source.name,
        "dataset_path": DATA_FORMATS[next(iter(files.values())).suffix],
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {s: str(p.resolve()) for s, p in files.items()}, "cache_dir": str(cache_dir)},
    }
    for key in SPLIT_KEYS:  # a split with no file must not be read (lm-eval touches the few-shot pool at load)
        if source.config.get(key) and source.config[key] not in files:
            override[key] = None
    _write_yaml(dest / source.name / f"{source.name}.yaml", override,
                f"rendered by jp-peft: {source.name} on local data")


def render_tasks(dest: str | Path, tasks: str | Sequence[str], data_dir: str | Path | None = None, *,
                 num_fewshot: int | None = None, include_path: Sequence[str | Path] = ()) -> PreparedTasks:
    """Write an lm-eval include directory for `tasks` under `dest` (never into the package)."""
    sources = check_available(tasks, data_dir, num_fewshot=num_fewshot, include_path=include_path)
    dest = Path(dest).resolve()
    include_dir, cache_dir = dest / "tasks", dest / "datasets_cache"
    include_dir.mkdir(parents=True, exist_ok=True)
    data_files: dict[str, dict[str, Path]] = {}
    for source in sources:
        if source.origin == "bundled":
            data_files[source.name] = _render_bundled(source, include_dir, cache_dir)
            continue
        _, found, _ = _locate_data(source, Path(data_dir) if data_dir else None, num_fewshot)
        if found:
            _render_local_override(source, found, include_dir, cache_dir)
            data_files[source.name] = found
        else:  # an include-path task on its own local data
            data_files[source.name] = {split: Path(f) for split, f in _local_data_files(source.config).items()}
    # later include paths override earlier ones: rendered YAMLs win over the user's originals
    return PreparedTasks(include_path=[*(Path(p).resolve() for p in include_path), include_dir],
                         names=[s.name for s in sources], sources={s.name: s for s in sources}, data_files=data_files)


@contextmanager
def prepared_tasks(tasks: str | Sequence[str], data_dir: str | Path | None = None, *,
                   num_fewshot: int | None = None, include_path: Sequence[str | Path] = ()) -> Iterator[PreparedTasks]:
    """render_tasks into a temporary directory that is removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="jp-peft-eval-"))
    try:
        yield render_tasks(tmp, tasks, data_dir, num_fewshot=num_fewshot, include_path=include_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

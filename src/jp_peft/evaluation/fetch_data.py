"""`jp-peft eval fetch-data DATA_DIR`: write the non-bundled tasks' data in the layout the eval stage reads
(DATA_DIR/<task>/<split>.jsonl, `tasks.py`), with DATA_DIR/MANIFEST.json holding each file's sha256.

Run it on a machine with network (rows from the Hugging Face Hub through `datasets.load_dataset`), or with
`--from SOURCE_DIR` from a local copy of the Hub data sets, one directory per data set and configuration:

    SOURCE_DIR/<dataset_path>/<dataset_name>/    e.g. SOURCE/Rakuten/JGLUE/JNLI/, SOURCE/Rowan/hellaswag/

each either a `DatasetDict.save_to_disk` directory (dataset_dict.json) or `<split>.jsonl` (.json, .parquet,
.csv) files. Rows are written unchanged; the manifest says where each file came from. An existing file is
never replaced silently: one whose sha256 matches the manifest is kept, any other is refused unless
`--overwrite`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jp_peft.evaluation.manifest import (MANIFEST, MANIFEST_FORMAT, ManifestError, read_manifest, recorded_sha256,
                                         write_manifest)
from jp_peft.resources import sha256_file
from jp_peft.evaluation.tasks import (DATA_FORMATS, TaskSource, UnknownTaskError, _hub_dataset, needed_splits,
                                      resolve_tasks)

# The production preset (recipes/configs/qwen25_500m_ja.yaml) owns which tasks run; its eval section is the default.
PRODUCTION_PRESET = "qwen25_500m_ja"


class FetchError(ValueError):
    """Bad input to fetch-data; the message names the option, field or file."""


def production_tasks() -> list[str]:
    """The production preset's eval tasks (tasks_ja, then tasks_en), as written there (sets unexpanded)."""
    from jp_peft.spec import load_preset

    ev = load_preset(PRODUCTION_PRESET).get("eval") or {}
    return [*(ev.get("tasks_ja") or ()), *(ev.get("tasks_en") or ())]


def fetchable_tasks(requested: Sequence[str]) -> list[TaskSource]:
    """The Hub-backed tasks among `requested` (bundled ones need nothing); refuses a name that is neither."""
    sources = resolve_tasks(list(requested))
    return [s for s in sources if s.origin == "production" and _hub_dataset(s.config) is not None]


def fetch_splits(source: TaskSource) -> dict[str, str]:
    """split -> what it is for: the evaluated split and, whatever the run's shot count, the few-shot pool
    (a later eval.num_fewshot must not need another fetch)."""
    return needed_splits(source.config, num_fewshot=max(1, source.config.get("num_fewshot") or 0))


def _local_dataset_dir(source_root: Path, config: dict[str, Any]) -> Path:
    where = source_root / config["dataset_path"]
    return where / config["dataset_name"] if config.get("dataset_name") else where


def _load_local(where: Path, splits: Sequence[str], task: str, cache_dir: Path):
    """{split: datasets.Dataset} from a save_to_disk directory or <split>.<ext> files under `where`."""
    import datasets

    if not where.is_dir():
        raise FetchError(f"--from: {where} is not a directory (the {task} data set: a save_to_disk directory "
                         "or <split>.jsonl files)")
    if (where / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(where))
        absent = [s for s in splits if s not in loaded]
        if absent:
            raise FetchError(f"--from: {where}/dataset_dict.json has no split {', '.join(absent)} "
                             f"(it has {', '.join(loaded)}), needed by {task}")
        return {s: loaded[s] for s in splits}
    out = {}
    for split in splits:
        hit = next((where / f"{split}{ext}" for ext in DATA_FORMATS if (where / f"{split}{ext}").is_file()), None)
        if hit is None:
            raise FetchError(f"--from: {where}/{split}.jsonl (or .json, .parquet, .csv) not found, needed by {task}")
        try:  # in memory, datasets' scratch files in cache_dir: nothing lands next to the user's files or in ~/.cache
            out[split] = datasets.load_dataset(DATA_FORMATS[hit.suffix], data_files={split: str(hit)}, split=split,
                                               keep_in_memory=True, cache_dir=str(cache_dir))
        except Exception as exc:  # datasets' own parse errors: name the file
            raise FetchError(f"--from: {hit}: not readable as {DATA_FORMATS[hit.suffix]} "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return out


def _load_hub(config: dict[str, Any], splits: Sequence[str]):
    import datasets

    dataset = datasets.load_dataset(config["dataset_path"], config.get("dataset_name"),
                                    **(config.get("dataset_kwargs") or {}))
    return {s: dataset[s] for s in splits}


def plan_files(data_dir: Path, sources: Sequence[TaskSource], manifest: dict[str, Any],
               overwrite: bool) -> dict[str, list[str]]:
    """task -> the splits to write; refuses (before anything is written) a file that exists and is not the
    one the manifest recorded, unless `overwrite`."""
    todo: dict[str, list[str]] = {}
    for source in sources:
        for split in fetch_splits(source):
            existing = [data_dir / source.name / f"{split}{ext}" for ext in DATA_FORMATS
                        if (data_dir / source.name / f"{split}{ext}").exists()]
            rel = f"{source.name}/{split}.jsonl"
            recorded = recorded_sha256(manifest, rel)
            if existing == [data_dir / rel] and recorded and sha256_file(existing[0]) == recorded and not overwrite:
                continue  # fetched before and unchanged
            if existing and not overwrite:
                why = "differs from its MANIFEST.json entry" if recorded else "is not in MANIFEST.json"
                raise FetchError(f"{existing[0]} exists and {why}; move it away or pass --overwrite to replace it")
            todo.setdefault(source.name, []).append(split)
    return todo


def fetch_task_data(data_dir: str | Path, tasks: Sequence[str], source_dir: str | Path | None = None, *,
                    overwrite: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write DATA_DIR/<task>/<split>.jsonl for each Hub-backed task of `tasks` and DATA_DIR/MANIFEST.json;
    returns the manifest. From the Hub, or from `source_dir` (the layout in the module docstring)."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise FetchError(f"DATA_DIR: {data_dir} is a file, not a directory")
    source_root = Path(source_dir) if source_dir is not None else None
    if source_root is not None and not source_root.is_dir():
        raise FetchError(f"--from: {source_root} is not a directory")
    try:
        sources = fetchable_tasks(tasks)
    except UnknownTaskError as exc:
        raise FetchError(f"--tasks: {exc}") from None
    if not sources:
        raise FetchError(f"--tasks: {', '.join(tasks)} needs no data (bundled tasks are in the package)")
    manifest = read_manifest(data_dir) if data_dir.is_dir() else {"format": MANIFEST_FORMAT, "files": {}}
    todo = plan_files(data_dir, sources, manifest, overwrite)
    data_dir.mkdir(parents=True, exist_ok=True)
    for n, source in enumerate(sources, 1):
        splits = todo.get(source.name, [])
        hub = _hub_dataset(source.config)
        if not splits:
            log(f"[{n}/{len(sources)}] {source.name}: kept (files match {MANIFEST})")
            continue
        origin = str(_local_dataset_dir(source_root, source.config)) if source_root else f"hf://datasets/{hub}"
        log(f"[{n}/{len(sources)}] {source.name}: {', '.join(splits)} from {origin}")
        with tempfile.TemporaryDirectory(prefix="jp-peft-fetch-") as scratch:
            rows = (_load_local(Path(origin), splits, source.name, Path(scratch)) if source_root
                    else _load_hub(source.config, splits))
            _write_splits(data_dir, source, splits, rows, hub, origin, manifest, log)
    write_manifest(data_dir, manifest)
    log(f"done: {len(manifest['files'])} files in {data_dir} ({MANIFEST}); pass eval.data_dir={data_dir.resolve()}")
    return manifest


def _write_splits(data_dir: Path, source: TaskSource, splits: Sequence[str], rows, hub: str, origin: str,
                  manifest: dict[str, Any], log: Callable[[str], None]) -> None:
    for split in splits:
        target = data_dir / source.name / f"{split}.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        rows[split].to_json(str(tmp), lines=True, force_ascii=False)
        os.replace(tmp, target)  # a fetch stopped midway leaves no half file under the name the eval reads
        entry = {"sha256": sha256_file(target), "bytes": target.stat().st_size, "rows": len(rows[split]),
                 "task": source.name, "split": split, "dataset": hub, "source": origin}
        manifest["files"][f"{source.name}/{split}.jsonl"] = entry
        write_manifest(data_dir, manifest)
        log(f"  wrote {target} ({entry['rows']} rows, sha256 {entry['sha256'][:12]})")


DESCRIPTION = """Write the evaluation data of the non-bundled (Hub) tasks into DATA_DIR, in the layout the eval
stage and `jp-peft eval --data-dir` read (DATA_DIR/<task>/<split>.jsonl: the evaluated split and the few-shot
pool), with DATA_DIR/MANIFEST.json holding each file's sha256, rows and source. Run it on a machine with network
(Hugging Face datasets), or with --from a local copy, then copy DATA_DIR to the cluster as it is and pass
eval.data_dir=DATA_DIR. Existing files are kept when they match the manifest and refused otherwise (--overwrite
replaces them). Bad input exits 2, naming the option or file."""

EPILOG = """examples:
  jp-peft eval fetch-data /data/lm-eval                                  # the production preset's tasks, from the Hub
  jp-peft eval fetch-data /data/lm-eval --tasks ja_leaderboard_gen
  jp-peft eval fetch-data /data/lm-eval --from /mirror/hf-datasets       # SOURCE/Rowan/hellaswag/, SOURCE/Rakuten/JGLUE/JNLI/, ..."""


def main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="jp-peft eval fetch-data", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", metavar="DATA_DIR", help="where to write <task>/<split>.jsonl and MANIFEST.json")
    parser.add_argument("--tasks", metavar="T1,T2",
                        help="tasks or sets (default: the production preset's eval.tasks_ja and eval.tasks_en)")
    parser.add_argument("--from", dest="source_dir", metavar="SOURCE_DIR",
                        help="read the data sets from SOURCE_DIR/<dataset_path>/<dataset_name>/ instead of the Hub")
    parser.add_argument("--overwrite", action="store_true", help="replace files that differ from the manifest")
    args = parser.parse_args(list(argv))
    tasks = args.tasks.split(",") if args.tasks else production_tasks()
    try:
        fetch_task_data(args.data_dir, tasks, args.source_dir, overwrite=args.overwrite)
    except (FetchError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

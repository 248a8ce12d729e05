"""DATA_DIR/MANIFEST.json, the record `jp-peft eval fetch-data` writes beside the Hub tasks' files: each file's
sha256, bytes, rows and source, keyed by its path under DATA_DIR (`<task>/<split>.jsonl`).

Its one owner: fetch-data writes it (fetch_data.py) and keeps a file only when it matches; every reader of
DATA_DIR (the launcher's plan-time check, the eval stage, `jp-peft eval`) refuses a file that no longer matches
its entry (tasks.py), so a score is never computed on data that changed after it was fetched. A file the
manifest does not list (a user's own .parquet, or a DATA_DIR written by hand) is read as it is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jp_peft.resources import sha256_file

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = 1


class ManifestError(ValueError):
    """DATA_DIR/MANIFEST.json is not a fetch-data manifest; the message names the file."""


def read_manifest(data_dir: Path) -> dict[str, Any]:
    """The manifest of `data_dir` (an empty one where there is none)."""
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        return {"format": MANIFEST_FORMAT, "files": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not JSON ({exc.msg}, line {exc.lineno}); move it away to fetch again") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ManifestError(f"{path}: not a fetch-data manifest (no 'files' mapping); move it away to fetch again")
    return manifest


def write_manifest(data_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = Path(data_dir) / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, Path(data_dir) / MANIFEST)


def recorded_sha256(manifest: dict[str, Any], rel: str) -> str | None:
    return (manifest["files"].get(rel) or {}).get("sha256")


def changed_files(data_dir: Path, files: Iterable[Path]) -> list[str]:
    """One line per file of `files` (under `data_dir`) whose sha256 is not the one its manifest entry recorded."""
    manifest = read_manifest(data_dir)
    lines = []
    for path in files:
        recorded = recorded_sha256(manifest, Path(path).relative_to(data_dir).as_posix())
        if recorded is not None and (now := sha256_file(path)) != recorded:
            lines.append(f"{path} differs from {Path(data_dir) / MANIFEST} (sha256 {now[:12]}, recorded "
                         f"{recorded[:12]} when it was fetched)")
    return lines

"""A NeMo 2 checkpoint directory (context/ + weights/) as one `.nemo` tarball, verified after writing.

NeMo 2 restores from the unpacked directory (`RestoreConfig(path=...)`); the archive is how a
checkpoint travels as one file. The archive is written aside and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

from jp_peft.resources import sha256_file

REQUIRED = ("context", "weights")
# What NeMo opens first in each part: io.load_context reads context/io.json; megatron.core's
# dist-checkpoint loader reads weights/metadata.json (dist_checkpointing.core.CONFIG_FNAME).
FIRST_READ = {"context": "io.json", "weights": "metadata.json"}


class ArchiveError(ValueError):
    pass


def check_checkpoint_dir(ckpt: str | Path) -> list[Path]:
    """The checkpoint's files, or ArchiveError naming what is missing. Reads no weights and imports
    nothing from NeMo, so that a wrong path is answered at once."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise ArchiveError(f"{ckpt}: does not exist")
    if not ckpt.is_dir():
        raise ArchiveError(f"{ckpt}: is a file, not a NeMo 2 checkpoint directory (context/ and weights/)")
    files = sorted(p for p in ckpt.rglob("*") if p.is_file())
    problems = []
    for part in REQUIRED:
        if not any(p.is_relative_to(ckpt / part) for p in files):
            problems.append(f"missing or empty {part}/")
        elif not (ckpt / part / FIRST_READ[part]).is_file():
            problems.append(f"no {part}/{FIRST_READ[part]}")
    if not problems and not _is_json_object(ckpt / "context" / "io.json"):
        problems.append("context/io.json is not a JSON object (partial or damaged context)")
    if problems:
        raise ArchiveError(f"{ckpt}: not a NeMo 2 checkpoint ({'; '.join(problems)})")
    return files


def _is_json_object(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (ValueError, OSError):
        return False


def write_nemo_archive(ckpt: str | Path, output: str | Path) -> dict:
    ckpt, output = Path(ckpt), Path(output)
    files = check_checkpoint_dir(ckpt)
    tmp = output.with_name(output.name + ".tmp")
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tmp, "w") as tar:  # uncompressed, as NeMo writes .nemo files
            for part in REQUIRED:
                tar.add(ckpt / part, arcname=part)
        report = verify_nemo_archive(tmp, ckpt)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, output)
    return report | {"archive": str(output), "files": len(files)}


def verify_nemo_archive(archive: str | Path, ckpt: str | Path) -> dict:
    """Every file of the checkpoint is in the archive with the same bytes, and nothing else is."""
    ckpt = Path(ckpt)
    expected = {str(p.relative_to(ckpt)): sha256_file(p) for p in check_checkpoint_dir(ckpt)}
    found = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile():
                h = hashlib.sha256()
                with tar.extractfile(member) as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                found[member.name] = h.hexdigest()
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    changed = sorted(k for k in expected if k in found and found[k] != expected[k])
    if missing or extra or changed:
        raise ArchiveError(f"{archive}: missing {missing[:5]}, unexpected {extra[:5]}, changed {changed[:5]}")
    return {"verified_files": len(found)}

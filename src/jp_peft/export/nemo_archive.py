"""A NeMo 2 checkpoint directory (context/ + weights/) as one `.nemo` tarball, verified after writing.

NeMo 2 restores from the unpacked directory (`RestoreConfig(path=...)`); the archive is how a
checkpoint travels as one file. The archive is written aside and renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

REQUIRED = ("context", "weights")


class ArchiveError(ValueError):
    pass


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_checkpoint_dir(ckpt: Path) -> list[Path]:
    ckpt = Path(ckpt)
    for part in REQUIRED:
        if not (ckpt / part).is_dir() or not any((ckpt / part).iterdir()):
            raise ArchiveError(f"{ckpt}: not a NeMo 2 checkpoint (missing or empty {part}/)")
    return sorted(p for p in ckpt.rglob("*") if p.is_file())


def write_nemo_archive(ckpt: str | Path, output: str | Path) -> dict:
    ckpt, output = Path(ckpt), Path(output)
    files = check_checkpoint_dir(ckpt)
    tmp = output.with_name(output.name + ".tmp")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tmp, "w") as tar:  # uncompressed, as NeMo writes .nemo files
        for part in REQUIRED:
            tar.add(ckpt / part, arcname=part)
    report = verify_nemo_archive(tmp, ckpt)
    os.replace(tmp, output)
    return report | {"archive": str(output), "files": len(files)}


def verify_nemo_archive(archive: str | Path, ckpt: str | Path) -> dict:
    """Every file of the checkpoint is in the archive with the same bytes, and nothing else is."""
    ckpt = Path(ckpt)
    expected = {str(p.relative_to(ckpt)): _digest(p) for p in check_checkpoint_dir(ckpt)}
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

"""Everything jp-peft reads at run time that ships with it, found with importlib.resources.

The bundled samples and blends (`data/`), the Slurm profiles (`slurm/`) and the recipe presets
(jp_peft.recipes, `configs/`) are package data, so an installed wheel finds them outside any
checkout. In a checkout, the repository's `data/ja`, `data/en`, `data/blends` and `slurm/*.yaml`
are links to these files, so the paths the README shows keep working.

Placeholders in presets, blends and profiles:
  {bundled}    this folder (its data/ and slurm/ mirror the checkout's)
  {repo}       the checkout jp-peft is imported from, as before {bundled} existed (its data/ links
               to the same files); without a checkout (a wheel), this folder
  {group_dir}  OUTPUT_DIR/GROUP, {run_dir} OUTPUT_DIR/NAME (jp_peft.spec.resolve)
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import subprocess
from pathlib import Path


def bundled_root() -> Path:
    """This package's folder on disk (wheels and editable installs both unpack to files)."""
    return Path(str(importlib.resources.files(__name__)))


def bundled(relative: str) -> Path:
    """A bundled file or folder, e.g. bundled('data/blends/ja90_en10.yaml')."""
    return bundled_root() / relative


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks (task data, checkpoint archives, tokenizer files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def profile_dir() -> Path:
    return bundled("slurm")


def presets_dir() -> Path:
    return Path(str(importlib.resources.files("jp_peft.recipes") / "configs"))


@functools.lru_cache(maxsize=1)
def checkout_root() -> Path | None:
    """The git checkout this package is imported from (a clone, an editable install), or None (a wheel).

    Asked of git rather than counted up from this file, so that an installed package never passes a
    site-packages folder off as a checkout: the package's own __init__.py must be tracked there."""
    here = Path(str(importlib.resources.files("jp_peft")))
    try:
        top = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10)
        if top.returncode != 0:
            return None
        tracked = subprocess.run(["git", "-C", str(here), "ls-files", "--error-unmatch", "__init__.py"],
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return Path(top.stdout.strip()) if tracked.returncode == 0 else None


def placeholder_values() -> dict[str, str]:
    """{bundled} and {repo} (see above)."""
    return {"bundled": str(bundled_root()), "repo": str(checkout_root() or bundled_root())}


def expand_bundled(text: str) -> str:
    """{bundled} and {repo} in a preset, blend or profile value."""
    for key, value in placeholder_values().items():
        text = text.replace("{" + key + "}", value)
    return text

"""The built wheel, installed outside any checkout, finds its presets, blends, profiles and bundled data
(importlib.resources) and runs the main job's first stages as `jp-peft run`."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, installed (without its dependencies: this venv has them) into
    a folder first on PYTHONPATH, so it shadows the editable install of the checkout."""
    wheels, site = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("site")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(wheels), str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("jp_peft-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    return wheel, site


def test_the_wheel_holds_its_package_data_and_no_generic_top_level_module(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"jp_peft", f"{wheel.name.split('-py3')[0]}.dist-info"}
    for needed in ("jp_peft/recipes/configs/smoke.yaml", "jp_peft/resources/data/blends/ja90_en10.yaml",
                   "jp_peft/resources/data/ja/cpt.train.jsonl", "jp_peft/resources/slurm/h100_pyxis.yaml",
                   "jp_peft/evaluation/tasks/jpeft_jcqa/test.jsonl"):
        assert needed in names, needed


def test_jp_peft_run_works_from_the_installed_wheel_outside_the_checkout(installed, tmp_path):
    _, site = installed
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "offline"}
    where = subprocess.run([sys.executable, "-c", "import jp_peft, jp_peft.resources as r; "
                            "print(jp_peft.__file__); print(r.checkout_root())"],
                           capture_output=True, text=True, cwd=work, env=env, timeout=120)
    assert where.stdout.split() == [str(site / "jp_peft" / "__init__.py"), "None"], where.stdout + where.stderr
    version = subprocess.run([sys.executable, "-m", "jp_peft.cli", "--version"], capture_output=True, text=True,
                             cwd=work, env=env, timeout=120)
    assert version.stdout.strip() == "jp-peft 0.1.0"
    proc = subprocess.run([sys.executable, "-m", "jp_peft.cli", "run", "--smoke", "--no-wandb", "--output-dir", "runs",
                           "--stages", "import,data,cpt", "cpt.train.max_steps=2", "cpt.train.val_check_interval=2",
                           "cpt.train.limit_val_batches=1", "cpt.train.warmup_steps=0"],
                          capture_output=True, text=True, cwd=work, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    spec = (work / "runs" / "smoke" / "spec.json").read_text()
    assert str(REPO) not in spec and str(site / "jp_peft" / "resources" / "data" / "ja") in spec  # bundled samples
    assert (work / "runs" / "smoke" / "cpt" / "metrics.json").exists()

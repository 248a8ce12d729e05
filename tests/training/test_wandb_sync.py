"""`jp-peft wandb sync DIR`: refuses without runs or without a key (exit 2, one line), and uploads exactly
the offline-run-* directories under DIR (training/wandb_run.offline_runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jp_peft.training.wandb_run import offline_runs

REPO = Path(__file__).resolve().parents[2]


def sync(directory: Path, key: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    if key is not None:
        env["WANDB_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "jp_peft.cli", "wandb", "sync", str(directory)], capture_output=True,
                          text=True, timeout=120, env=env)


def a_run_tree(root: Path) -> list[Path]:
    """Offline runs at several depths, beside things that are not one: the runs, sorted."""
    runs = [root / "smoke" / "wandb" / "offline-run-20261207_010101-abc", root / "sweep" / "r8" / "wandb" /
            "offline-run-20261207_020202-def", root / "offline-run-20261207_030303-top"]
    for run in runs:
        (run / "files").mkdir(parents=True)
    (root / "smoke" / "wandb" / "run-20261207_010101-online").mkdir()  # an online run: already uploaded
    (root / "smoke" / "wandb" / "offline-run-notes.txt").write_text("a file, not a run")
    (root / "smoke" / "wandb" / "latest-run").mkdir()
    return sorted(runs)


@pytest.mark.unit
def test_offline_runs_are_exactly_the_offline_run_directories(tmp_path):
    runs = a_run_tree(tmp_path)
    assert offline_runs(str(tmp_path)) == runs
    assert offline_runs(str(tmp_path / "smoke")) == [p for p in runs if p.is_relative_to(tmp_path / "smoke")]
    assert offline_runs(str(tmp_path / "nothing_here")) == []


@pytest.mark.integration
def test_sync_without_runs_exits_2(tmp_path):
    proc = sync(tmp_path, "fakekey")
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: no offline W&B runs under {tmp_path}"


@pytest.mark.integration
def test_sync_without_a_key_exits_2_and_uploads_nothing(tmp_path):
    a_run_tree(tmp_path)
    proc = sync(tmp_path, None)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: WANDB_API_KEY is not set; export it (or run `wandb login`) and retry"
    assert "syncing" not in proc.stdout

"""Local executor: what a stage process finds on its PATH."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from jp_peft.cluster.executors import local_executor

pytestmark = pytest.mark.integration


def test_local_tasks_never_run_programs_from_the_launch_directory(tmp_path, monkeypatch):
    """A `git` in the directory you launch from must not shadow /usr/bin/git (W&B probes git), and a
    program found only there must not run at all, whether torchx or an empty PATH entry puts it there."""
    import nemo_run as run

    launch_dir = tmp_path / "launch"
    launch_dir.mkdir()
    marker = tmp_path / "ran-from-launch-dir"
    for name in ("git", "jp-peft-probe"):
        (launch_dir / name).write_text(f"#!/bin/sh\necho {name} >> {marker}\n")
        (launch_dir / name).chmod(0o755)
    monkeypatch.chdir(launch_dir)
    monkeypatch.setenv("PATH", f"{os.environ['PATH']}::.")  # an empty entry and "." both mean the cwd
    report = tmp_path / "task_path.txt"
    probe = f'echo "$PATH" > {report}; command -v git >> {report}; git --version; jp-peft-probe; exit 0'

    with run.Experiment("path-probe", base_dir=str(tmp_path / "experiments"), log_level="WARN") as exp:
        exp.add(run.Partial(subprocess.run, ["/bin/sh", "-c", probe], check=True), executor=local_executor(),
                name="probe", tail_logs=False)
        exp.run(sequential=True, detach=False, tail_logs=False)

    assert report.exists(), "the task did not run"
    task_path, git = (report.read_text().splitlines() + [""])[:2]
    entries = task_path.split(":")
    assert not marker.exists(), f"the task ran {marker.read_text().split()} from the launch directory"
    assert str(launch_dir) not in entries and "" not in entries and "." not in entries, entries
    assert all(Path(entry).is_absolute() for entry in entries), entries
    assert git == (shutil.which("git", path=task_path) or ""), git  # the system's git, if there is one

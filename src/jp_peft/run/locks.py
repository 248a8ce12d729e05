"""Whether a launch may use a run directory: the same spec resumes, another one is refused, one launch at a time.

A run directory remembers the resolved spec it was made with (spec.json). Launching into it again
with the same spec resumes: finished stages are kept (their records carry the spec's fingerprint),
unfinished ones continue from their checkpoints. Launching with a different spec is refused before
anything starts, naming the fields that differ, unless the user asks to start over (--overwrite).
A lock file per run (and per group, for the shared stages) keeps two launches out of each other's way;
on Slurm the submitted job ids are kept beside it, so a second launch also waits for those jobs.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from jp_peft.records import layout as rundir
from jp_peft.records.fingerprint import comparable, differences
from jp_peft.spec import ExperimentSpec, SpecError


class RunBusy(RuntimeError):
    """Another launch holds the run directory, or its Slurm jobs are still queued or running."""


def check_reuse(specs: list[ExperimentSpec], overwrite: bool) -> list[ExperimentSpec]:
    """Refuse (SpecError, before anything starts) a run directory made with another spec; returns the
    runs that --overwrite will start over."""
    restart = []
    for spec in specs:
        path = rundir.spec_file(spec)
        if not path.exists():
            continue
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}
        changed = differences(comparable(old), comparable(spec.to_dict()))
        if changed and overwrite:
            restart.append(spec)
        elif changed:
            shown = "\n  ".join(changed[:12]) + (f"\n  ... and {len(changed) - 12} more" if len(changed) > 12 else "")
            raise SpecError(f"{spec.run_dir} was made with another spec; the same spec resumes it, a different one "
                            f"is refused:\n  {shown}\nUse --name NEW for a new run, or --overwrite to start this one over")
    return restart


def start_over(spec: ExperimentSpec) -> None:
    """--overwrite: remove what the run computed (its own directory; the group's shared stages too when
    the run is its own group)."""
    for path in {spec.run_dir, spec.group_dir}:
        if path == spec.group_dir and spec.group_dir != spec.run_dir:
            continue
        for child in path.iterdir() if path.exists() else ():
            if child.name == rundir.LOCK_NAME:
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


class RunLocks:
    """Exclusive locks on the group and run directories for the lifetime of a launch (fcntl: released
    by the kernel when the launcher dies, so a crash never leaves a stale lock)."""

    def __init__(self, specs: list[ExperimentSpec]):
        dirs = {spec.group_dir for spec in specs} | {spec.run_dir for spec in specs}
        self.paths = sorted(rundir.lock_file(d) for d in dirs)
        self.handles: list = []

    def __enter__(self):
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)}
        try:
            for path in self.paths:
                path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(path, "a+", encoding="utf-8")
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.seek(0)
                    who = handle.read().strip() or "unknown"
                    handle.close()
                    raise RunBusy(f"{path.parent} is in use by another launch ({who}); wait for it to finish "
                                  "or stop it (Ctrl-C)") from None
                self.handles.append(handle)
                _check_jobs(path.parent)
                handle.seek(0)
                handle.truncate()
                handle.write(json.dumps(holder) + "\n")
                handle.flush()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.close()
        self.handles = []


def record_jobs(specs: list[ExperimentSpec], jobs: dict[str, str]) -> None:
    """Slurm: the submitted job ids, so that a later launch into these directories waits for them."""
    for d in {spec.group_dir for spec in specs} | {spec.run_dir for spec in specs}:
        rundir.write_json(rundir.jobs_file(d), jobs)


def _check_jobs(directory: Path) -> None:
    path = rundir.jobs_file(directory)
    if not path.exists() or shutil.which("scontrol") is None:
        return
    from jp_peft.cluster.slurm_jobs import is_finished, job_state

    try:
        jobs = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return
    active = {name: jid for name, jid in jobs.items() if not is_finished(*job_state(jid))}
    active = {name: jid for name, jid in active.items() if job_state(jid)[0] != "UNKNOWN"}  # purged: gone
    if active:
        listed = ", ".join(f"{name} (job {jid})" for name, jid in active.items())
        raise RunBusy(f"{directory} has Slurm jobs of an earlier launch still queued or running: {listed}; "
                      "wait for them (squeue) or cancel them (scancel)")

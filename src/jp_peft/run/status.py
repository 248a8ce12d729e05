"""What a run directory says about its stages (`jp-peft status RUN_DIR`): finished, unfinished (with
the newest progress line of a training stage) or not started; whether a launch holds the run; the
state of the Slurm jobs that the last launch submitted. Reads files only: safe while the run goes on."""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

from jp_peft.export.deployability import summary_line
from jp_peft.records import layout as rundir
from jp_peft.records.export_record import ExportRecord
from jp_peft.run.plan import run_sequence, task_name
from jp_peft.records.progress import latest_progress
from jp_peft.records.fingerprint import finished_earlier, fingerprint
from jp_peft.spec import SHARED_STAGES, TRAINED_STAGES, ExperimentSpec, SpecError, read_spec_file
from jp_peft.spec.stages import EXPORT, stage as stage_row


def load_run(run_dir: Path) -> ExperimentSpec:
    path = rundir.spec_file_of(run_dir)
    if not path.is_file():
        raise SpecError(f"{run_dir}: not a jp-peft run directory (no spec.json)")
    return read_spec_file(path)


def held_by(run_dir: Path) -> str | None:
    """The launch that holds the run's lock (its host, PID and command), or None."""
    path = rundir.lock_file(run_dir)
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "unknown"
    return None


def stage_state(spec: ExperimentSpec, stage: str, target: str | None) -> str:
    record = rundir.stage_record(spec, stage, target)
    if record.exists():
        if stage in SHARED_STAGES:  # shared stages are reused by every spec of the group
            return "done"
        return "done" if finished_earlier(record, fingerprint(spec, stage)) else "stale (another spec)"
    if stage in TRAINED_STAGES and rundir.train_log(spec, stage).exists():
        return "unfinished"
    return "not started"


def slurm_states(run_dir: Path) -> dict[str, str]:
    path = rundir.jobs_file(run_dir)
    if not path.exists() or shutil.which("scontrol") is None:
        return {}
    from jp_peft.cluster.slurm_jobs import job_state

    jobs = json.loads(path.read_text(encoding="utf-8"))
    return {name: f"job {jid} {job_state(jid)[0]}" for name, jid in jobs.items()}


def status_lines(run_dir: Path) -> list[str]:
    spec = load_run(run_dir)
    holder = held_by(spec.run_dir)
    jobs = slurm_states(spec.run_dir)
    lines = [f"{spec.run_dir}: {spec.backend} backend, " + (f"held by {holder}" if holder else "no launch holds it")]
    for stage, target in [*run_sequence(spec, shared=True), *run_sequence(spec, shared=False)]:
        name = task_name(spec, stage, target)
        state = stage_state(spec, stage, target)
        lines.append(f"  {name:<28} {state}" + (f"  ({jobs[name]})" if name in jobs else ""))
        if stage in TRAINED_STAGES and state != "not started":
            latest = latest_progress(rundir.train_log(spec, stage), stage, spec.stage(stage).train.max_steps)
            if latest is not None:
                lines.append(f"    {latest[1]}")
        if stage_row(stage).kind == EXPORT and state == "done":
            lines += deployability_lines(rundir.export_record(spec, target))
    return lines


def deployability_lines(path: Path) -> list[str]:
    """One line per exported artifact: where it was verified, refused or not verified (the export record)."""
    record = ExportRecord.read(path, "status")
    if not record.deployability:
        return ["    deployability: not recorded (an export by an older jp-peft; rerun the export stage)"]
    return [f"    {artifact:<10} {summary_line(entries)}" for artifact, entries in record.deployability.items()]

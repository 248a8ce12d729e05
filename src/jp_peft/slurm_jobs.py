"""Follow submitted Slurm jobs with `scontrol` (works without slurmdbd, unlike sacct)."""

from __future__ import annotations

import re
import subprocess
import time

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}


def job_id_of(handle: str) -> str:
    """NeMo-Run's handle `slurm_tunnel://nemo_run/<job id>/...` -> `<job id>`."""
    _, _, path = handle.partition("://")
    return path.split("/")[1]


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def job_state(job_id: str) -> tuple[str, str]:
    info = job_info(job_id)
    return info.get("JobState", "UNKNOWN"), info.get("Reason", "")


def is_finished(state: str, reason: str) -> bool:
    # A dependent of a failed job never runs: pending with DependencyNeverSatisfied, or cancelled.
    return state in TERMINAL or (state == "PENDING" and reason == "DependencyNeverSatisfied")


def wait_for(job_ids: dict[str, str], timeout_s: float = 24 * 3600, poll_s: float = 5.0, log=print,
             on_poll=None) -> dict[str, tuple]:
    """Wait until every job (name -> id) has finished; returns name -> (state, reason). `on_poll()`
    runs at every poll (the launcher prints training progress there)."""
    deadline = time.time() + timeout_s
    last: dict[str, tuple] = {}
    while True:
        states = {name: job_state(jid) for name, jid in job_ids.items()}
        for name, state in states.items():
            if state != last.get(name):
                log(f"  {name} (job {job_ids[name]}): {state[0]}" + (f" ({state[1]})" if state[1] not in ("", "None") else ""))
        last = states
        if on_poll is not None:
            on_poll()
        if all(is_finished(*s) for s in states.values()) or time.time() > deadline:
            return states
        time.sleep(poll_s)


def cancel_never_runnable(job_ids: dict[str, str], states: dict[str, tuple]) -> list[str]:
    """Cancel the jobs Slurm keeps pending forever because a dependency failed (without
    kill_invalid_depend they would stay in the queue); returns their names."""
    never = [name for name, (state, reason) in states.items()
             if state == "PENDING" and reason == "DependencyNeverSatisfied"]
    if never:
        subprocess.run(["scancel", *(job_ids[name] for name in never)], capture_output=True, text=True)
    return never

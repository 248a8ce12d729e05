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
             on_poll=None, depends_on: dict[str, list[str]] | None = None, on_cancel=None) -> dict[str, tuple]:
    """Wait until every job (name -> id) has finished; returns name -> (state, reason). `on_poll()`
    runs at every poll (the launcher prints training progress there). With `depends_on` (name -> the
    names it runs after), the jobs that can never start are cancelled as soon as a job they wait on
    fails (cancel_unrunnable), and `on_cancel(names)` says which."""
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
        if depends_on and (cancelled := cancel_unrunnable(job_ids, depends_on, states)):
            if on_cancel is not None:
                on_cancel(cancelled)
            continue  # read their new state at once
        if all(is_finished(*s) for s in states.values()) or time.time() > deadline:
            return states
        time.sleep(poll_s)


def unrunnable(states: dict[str, tuple], depends_on: dict[str, list[str]]) -> list[str]:
    """The pending jobs that wait, directly or through other pending jobs, on a job that ended without
    completing: their `afterok` can never be met."""
    failed = {name for name, (state, _) in states.items() if state in TERMINAL and state != "COMPLETED"}
    doomed: set[str] = set()
    grew = True
    while grew:
        grew = False
        for name, after in depends_on.items():
            if (name in states and name not in doomed and states[name][0] == "PENDING"
                    and any(d in failed or d in doomed for d in after)):
                doomed.add(name)
                grew = True
    return sorted(doomed)


def cancel_unrunnable(job_ids: dict[str, str], depends_on: dict[str, list[str]], states: dict[str, tuple]
                      ) -> list[str]:
    """Cancel the jobs that can never start (unrunnable); returns their names. Slurm marks only a failed
    job's direct dependents DependencyNeverSatisfied and leaves theirs waiting on them: without
    `kill_invalid_depend` (not Slurm's default) the whole chain stays pending for ever, and with it the
    scheduler cancels one link per pass."""
    doomed = unrunnable(states, depends_on)
    if doomed:
        subprocess.run(["scancel", *(job_ids[name] for name in doomed)], capture_output=True, text=True)
    return doomed

"""Plan, build and launch an experiment on the local or Slurm executor, then report.

Used by experiments/qwen_lora_ja.py; separate from it so that everything a NeMo-Run task
points at is importable from the installed package.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from jp_peft.backends import backend_of
from jp_peft.records import layout as rundir
from jp_peft.run.plan import PlannedTask, add_tasks, executor_factory, new_experiment, plan, task_record
from jp_peft.spec.stages import EVAL, TRAINED_STAGES as TRAINING, stage as stage_row


def launch(values: dict, overrides: list[str], sweep: list[str], stages: list[str] | None, *, executor: str,
           profile: str, dryrun: bool, wait: bool, overwrite: bool = False, verbose: bool = False) -> int:
    from jp_peft.run.locks import RunLocks, check_reuse, start_over

    if executor == "slurm":  # a missing or broken profile is refused before anything is planned or written
        from jp_peft.cluster.executors import SlurmProfile, check_placeholders, load_profile, use_slurm_conf

        profile = profile if isinstance(profile, SlurmProfile) else load_profile(profile)
        check_placeholders(profile, dryrun)
        if not dryrun:  # before the locks ask scontrol about earlier jobs; a dry run needs no Slurm
            use_slurm_conf(profile)
    tasks = plan(values, overrides, sweep, stages, dryrun=dryrun)
    first = tasks[0].spec
    specs = list({t.spec.run_dir: t.spec for t in tasks}.values())
    if executor == "slurm":  # a hub model on offline nodes, paths outside the container's mounts
        from jp_peft.cluster.offline import check_offline

        check_offline(profile, specs, dryrun, shared_env_of=lambda spec: backend_of(spec).shared_env)
    restart = check_reuse(specs, overwrite)  # a different spec is refused before anything starts
    check_eval_tasks(specs, dryrun)
    print(f"experiment {first.group_name}: {len(tasks)} tasks on the {executor} executor ({first.backend} backend)")
    for task in tasks:
        after = f" after {', '.join(task.depends_on)}" if task.depends_on else ""
        print(f"  {task.name}{after}")
    if dryrun:
        from jp_peft.run.dryrun import show_dryrun

        return show_dryrun(tasks, executor, profile, verbose)
    check_output_dir(first)
    with RunLocks(specs):
        for spec in restart:
            print(f"--overwrite: starting {spec.run_dir} over")
            start_over(spec)
        base_dir = rundir.launches_dir(first)
        base_dir.mkdir(parents=True, exist_ok=True)
        for spec in specs:  # the resolved spec, for reruns and comparison
            rundir.write_json(rundir.spec_file(spec), spec.to_dict())
        if executor == "local":
            return run_local(tasks, executor_factory("local", profile, base_dir), base_dir)
        exp = new_experiment(first.group_name, base_dir)
        with exp:
            add_tasks(exp, tasks, executor_factory(executor, profile, base_dir))
            started = time.perf_counter()
            exp.run(sequential=False, detach=True, tail_logs=False)
        return follow_slurm(tasks, specs, exp, wait, started)


def check_eval_tasks(specs, dryrun: bool) -> None:
    """Every eval stage's tasks are known and have their data, before anything starts: a launch is refused
    (one line per task, naming the field and how to provide the data), a dry run shows the lines as warnings
    (it runs nothing, and a cluster's data directory may only exist where the jobs run)."""
    from jp_peft.evaluation.suite import suite_problems
    from jp_peft.spec import SpecError

    problems = list(dict.fromkeys(line for spec in specs for line in suite_problems(spec)))
    if problems and not dryrun:
        raise SpecError("\n".join(problems))
    for line in problems:
        print(f"warning: the eval stage would fail: {line}", file=sys.stderr)


def check_output_dir(spec) -> None:
    """A file where a directory belongs, or a directory we cannot write: say so before anything starts."""
    from jp_peft.spec import SpecError

    out = Path(spec.output_dir)
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise SpecError(f"--output-dir: {existing} is a file, not a directory")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise SpecError(f"--output-dir: {existing} is not writable")


class Interrupted(Exception):
    """Ctrl-C or SIGTERM reached the launcher."""


def run_local(tasks: list[PlannedTask], executor_for, base_dir: Path) -> int:
    """The local executor, one task at a time in dependency order (a local machine's GPUs are shared by
    every task, so tasks of one level would only compete). A failed task stops the tasks that depend on
    it; Ctrl-C or SIGTERM stops the running task (it saves a checkpoint at the end of its step) and
    starts no other."""
    import signal

    from torchx.schedulers.local_scheduler import SignalException

    outcome: dict[str, str] = {}
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = time.perf_counter()
    try:
        for task in tasks:
            failed_deps = [d for d in task.depends_on if outcome.get(d) != "done"]
            if failed_deps:
                outcome[task.name] = "not started"
                print(f"NOT STARTED: {task.name}: {', '.join(failed_deps)} did not finish", file=sys.stderr)
                continue
            outcome[task.name] = run_one(task, executor_for, base_dir)
    except (Interrupted, KeyboardInterrupt, SignalException) as exc:
        running = next((t for t in tasks if t.name not in outcome), None)
        if running is not None:
            outcome[running.name] = "interrupted"
        print(f"\ninterrupted ({exc or type(exc).__name__}): {running.name if running else 'nothing'} was stopped"
              + (" (a training stage saved a checkpoint at the end of its step)" if running and running.stage in TRAINING
                 else "") + "; no further stage was started.\nResume with the same command: finished stages are "
              "kept, unfinished ones continue from their checkpoints.", file=sys.stderr)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return report_local(tasks, outcome, time.perf_counter() - started)


def run_one(task: PlannedTask, executor_for, base_dir: Path) -> str:
    """Run one task through NeMo-Run's local executor and wait; "done" only if it wrote a current record."""
    import signal

    from jp_peft.run.plan import task_config
    from jp_peft.records.fingerprint import finished_earlier, fingerprint

    exp = new_experiment(task.name, base_dir, quiet=True)
    watcher = ProgressWatcher(task)

    def stop(signum, frame):
        # Stop the task here, in the handler: the exception below unwinds through NeMo-Run's thread pool,
        # which waits for the task. torchx sends SIGTERM to the task's process group (the stage saves at the
        # end of its step and exits), SIGKILL after 10 s.
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cancellation short
        exp.cancel(task.name)
        raise Interrupted(signal.Signals(signum).name)

    print(f"[jp-peft] {task.name}: started", flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    watcher.start()
    try:
        with exp:  # leaving the block waits for the task
            exp.add(task_config(task), executor=executor_for(task), name=task.name, tail_logs=False)
            exp.run(sequential=True, detach=False, tail_logs=False)
            for sig in (signal.SIGINT, signal.SIGTERM):  # torchx's scheduler put in handlers of its own
                signal.signal(sig, stop)
    finally:
        watcher.stop()
    record = task_record(task)
    if stage_row(task.stage).shared:  # idempotent by themselves: a record written by this attempt
        ok = record.exists() and record.stat().st_mtime >= watcher.started_at
    else:
        ok = finished_earlier(record, fingerprint(task.spec, task.stage))
    print(f"[jp-peft] {task.name}: {'done' if ok else 'FAILED'} after {time.time() - watcher.started_at:.0f} s", flush=True)
    if not ok:
        log = task_log(exp, task)
        print(f"FAILED: {task.name}: {record} was not written; log: {log}", file=sys.stderr)
        print(last_lines(log), file=sys.stderr)
    return "done" if ok else "failed"


def last_lines(log: str, n: int = 20) -> str:
    path = Path(log)
    if not path.is_file():
        return "  (no log file)"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join("  | " + line for line in lines[-n:])


class ProgressWatcher:
    """The launcher's view of a running stage: one line per new training step (step/max_steps, loss,
    tokens/s, ETA) from the stage's train_log.jsonl, and a heartbeat for the other stages."""

    def __init__(self, task: PlannedTask, every_s: float = 2.0):
        import threading

        self.task, self.every_s = task, every_s
        self.started_at = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.started_at = time.time()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    @staticmethod
    def _say(line: str) -> None:
        # the real stdout: NeMo-Run's live display captures sys.stdout while it waits for the task
        print(line, file=sys.__stdout__, flush=True)

    def _run(self) -> None:
        from jp_peft.records.progress import latest_progress

        spec, stage = self.task.spec, self.task.stage
        log = rundir.train_log(spec, stage) if stage in TRAINING else None
        shown, last_beat = 0, time.time()
        while not self._stop.wait(self.every_s):
            latest = latest_progress(log, f"{self.task.name}:", spec.stage(stage).train.max_steps,
                                     since=self.started_at) if log is not None else None
            if latest is not None and latest[0] != shown:
                shown = latest[0]
                self._say(latest[1])
                last_beat = time.time()
            if time.time() - last_beat >= 30:
                self._say(f"[jp-peft] {self.task.name}: running ({time.time() - self.started_at:.0f} s)")
                last_beat = time.time()


def report_local(tasks: list[PlannedTask], outcome: dict[str, str], seconds: float) -> int:
    print_summaries(tasks)
    done = sum(1 for t in tasks if outcome.get(t.name) == "done")
    print(f"{done}/{len(tasks)} tasks finished in {seconds:.0f} s")
    return 0 if done == len(tasks) else (130 if "interrupted" in outcome.values() else 1)


def print_summaries(tasks: list[PlannedTask]) -> None:
    from jp_peft.run.summary import format_summary

    for spec in {t.spec.run_dir: t.spec for t in tasks if stage_row(t.stage).kind == EVAL}.values():
        summary_path = rundir.summary_file(spec)
        if summary_path.exists():
            print(format_summary(json.loads(summary_path.read_text(encoding="utf-8"))))
            print(f"  metrics: {spec.run_dir}/<stage>/metrics.json; W&B: {spec.run_dir / 'wandb'}")


def follow_slurm(tasks: list[PlannedTask], specs, exp, wait: bool, started: float) -> int:
    """Print each task's job id and log; with --wait, follow them to the end (scontrol, no sacct needed)."""
    from jp_peft.run.locks import record_jobs
    from jp_peft.cluster.slurm_jobs import job_id_of, wait_for

    jobs = {job.id: job_id_of(job.handle) for job in exp.jobs}
    record_jobs(specs, jobs)
    for job in exp.jobs:
        print(f"  {job.id}: slurm job {jobs[job.id]}, log {job.executor.job_details.stdout}")
    if not wait:
        print("submitted; follow with `squeue`, or rerun with --wait")
        return 0
    def said_cancelled(names: list[str]) -> None:
        print(f"cancelled {', '.join(names)}: a job they depend on failed, so they could never start", file=sys.stderr)

    states = wait_for(jobs, on_poll=slurm_progress_printer(tasks), depends_on={t.name: t.depends_on for t in tasks},
                      on_cancel=said_cancelled)
    for job in exp.jobs:
        state, reason = states[job.id]
        if state != "COMPLETED":
            print(f"FAILED: {job.id}: {state} ({reason}); log: {job.executor.job_details.stdout}", file=sys.stderr)
    return report(tasks, exp, time.perf_counter() - started)


def slurm_progress_printer(tasks: list[PlannedTask]):
    """For --wait: a function that prints each training job's newest progress line once (the same line
    a local launch shows, read from the stage's train_log.jsonl on the shared filesystem)."""
    from jp_peft.records.progress import latest_progress

    since, shown = time.time(), {}

    def print_new() -> None:
        for task in tasks:
            if task.stage in TRAINING:
                latest = latest_progress(rundir.train_log(task.spec, task.stage), f"{task.name}:",
                                         task.spec.stage(task.stage).train.max_steps, since=since)
                if latest is not None and shown.get(task.name) != latest[0]:
                    shown[task.name] = latest[0]
                    print(latest[1], flush=True)

    return print_new


def report(tasks: list[PlannedTask], exp, seconds: float) -> int:
    failed = [t for t in tasks if not task_record(t).exists()]
    for task in failed:
        print(f"FAILED: {task.name}: {task_record(task)} was not written; log: {task_log(exp, task)}",
              file=sys.stderr)
    print_summaries(tasks)
    print(f"{len(tasks) - len(failed)}/{len(tasks)} tasks finished in {seconds:.0f} s")
    return 1 if failed else 0


def task_log(exp, task: PlannedTask) -> str:
    job_dir = Path(exp._exp_dir) / task.name
    logs = sorted(job_dir.glob("**/*log*")) if job_dir.exists() else []
    return str(logs[0]) if logs else str(job_dir)

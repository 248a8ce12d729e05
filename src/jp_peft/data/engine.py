"""Run the stages of `jp-peft data prepare` on datatrove's executors: `LocalPipelineExecutor` (worker
processes on this machine) or `SlurmPipelineExecutor` (one array job per stage, each after the one
before), with datatrove's completion marks, so that a rerun skips the tasks that finished.

Adaptations of datatrove 0.3.0 (the release that installs beside NeMo 2.7.3: 0.4 and later need
numpy>=2), each checked against the code it adapts:
- datatrove/executor/local.py, LocalPipelineExecutor.run: multiprocess.Pool replaces a worker that
  dies (the OOM killer, a segfault) and waits for its task forever; here a concurrent.futures pool
  (jp_peft.data.pool) reports it, and stops the other workers when the run fails.
- datatrove/utils/logging.py:50, add_task_logger: every task logs to stderr at INFO (and a failed
  one its traceback); here a local task logs only to its file (stages/NAME/logs/task_RANK.log),
  so that the command's own output stays one line per error. Slurm tasks log to their job log too.
- datatrove/executor/slurm.py, SlurmPipelineExecutor.launch_merge_stats: an extra job per stage to
  merge statistics that jp-peft's merge stage gathers itself; not submitted.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from datatrove.executor import base as datatrove_base
from datatrove.executor.local import LocalPipelineExecutor
from datatrove.executor.slurm import SlurmPipelineExecutor
from datatrove.utils.logging import logger

from jp_peft.data.errors import (ConfigError, InputFileError, NothingKeptError, PrepareError, StrictModeError,
                                 Terminated, WorkerError)
from jp_peft.data.pool import map_in_workers
from jp_peft.data.progress import Progress
from jp_peft.data.workdir import WorkDir

RECORDED_ERRORS = {cls.__name__: cls for cls in (StrictModeError, InputFileError, NothingKeptError, ConfigError)}
class SlurmTaskError(WorkerError):
    """A Slurm task did not finish, resubmitted or not: the work directory, with its logs, is kept."""


SLURM_RETRIES = 1  # a Slurm task that died without a recorded error (node failure, OOM) is resubmitted once
SLURM_POLL_S = 2.0


# --- datatrove adaptations ------------------------------------------------------------------------

_UPSTREAM_RUN_FOR_RANK = "logfile = add_task_logger(self.logging_dir, rank, local_rank)"


def _check_upstream() -> None:
    if _UPSTREAM_RUN_FOR_RANK not in inspect.getsource(datatrove_base.PipelineExecutor._run_for_rank):
        raise RuntimeError("datatrove's PipelineExecutor._run_for_rank no longer sets up task logging the way "
                           "jp_peft.data.engine adapts it: review the adaptation")


def _task_logger(logging_dir, rank: int, local_rank: int = 0):
    """datatrove's add_task_logger, without the stderr sink outside a Slurm job."""
    logger.remove()
    logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
    if "SLURM_ARRAY_TASK_ID" in os.environ:
        logger.add(sys.stderr, colorize=False, level="INFO")
    logger.add(logfile, colorize=False, level="DEBUG")
    logger.info(f"Launching pipeline for {rank=}")
    return logfile


def _close_task_logger(logfile) -> None:
    logger.complete()
    logger.remove()
    logfile.close()


_check_upstream()
datatrove_base.add_task_logger = _task_logger
datatrove_base.close_task_logger = _close_task_logger
logger.remove()  # datatrove's import-time stderr sink: the launcher reports in its own words


class _StageTasks:
    """What both executors add to datatrove's task runner: the task's wall time and, for an error the
    user must act on, a record the launcher turns back into the same error (and exit status)."""

    stage: str

    def _run_for_rank(self, rank: int, local_rank: int = 0):
        work = WorkDir(Path(self.logging_dir.path).parent.parent)  # LOGS/STAGE/ -> the work directory
        started = time.perf_counter()
        try:
            stats = super()._run_for_rank(rank, local_rank)
        except PrepareError as exc:
            if type(exc).__name__ in RECORDED_ERRORS:
                work.write_json(work.sub("errors", f"{self.stage}-{rank:05d}.json"),
                                {"type": type(exc).__name__, "message": str(exc)})
            raise
        work.write_json(work.sub("timing", f"{self.stage}-{rank:05d}.json"),
                        {"stage": self.stage, "seconds": time.perf_counter() - started})
        return stats


_RUNNING: LocalStageExecutor | None = None


def _run_rank(rank: int) -> None:
    _RUNNING._run_for_rank(rank)


def _init_task_process() -> None:
    # The launcher handles Ctrl-C and SIGTERM: it stops the workers and decides what is kept.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class LocalStageExecutor(_StageTasks, LocalPipelineExecutor):
    def __init__(self, stage: str, pipeline: list, tasks: int, workers: int, logging_dir: str):
        super().__init__(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir, start_method="fork")
        self.stage = stage

    def run(self):
        """The stage's unfinished tasks in this process (one worker) or in forked workers, in rank order."""
        global _RUNNING
        ranks = self.get_incomplete_ranks()
        workers = min(self.workers, len(ranks))
        if workers <= 1:
            for rank in ranks:
                self._run_for_rank(rank)
            return
        _RUNNING = self
        try:
            for _ in map_in_workers(_run_rank, ranks, workers, _init_task_process, ()):
                pass
        finally:
            _RUNNING = None


class SlurmStageExecutor(_StageTasks, SlurmPipelineExecutor):
    def __init__(self, stage: str, pipeline: list, tasks: int, profile, logging_dir: str, depends=None):
        env_command = " && ".join(profile.setup) if profile.setup else _activate_this_python()
        sbatch_args = {"account": profile.account} if profile.account else {}
        if profile.mem:
            sbatch_args["mem"] = profile.mem
        srun_args = {}
        if profile.container_image:
            srun_args["container-image"] = profile.container_image
            if profile.container_mounts:
                srun_args["container-mounts"] = ",".join(profile.container_mounts)
        super().__init__(pipeline, tasks=tasks, time=profile.time, partition=profile.partition,
                         cpus_per_task=profile.cpus_per_task or 1, job_name=f"jp-peft.prepare.{stage}",
                         qos=profile.qos or "", env_command=env_command, sbatch_args=sbatch_args,
                         depends=depends, logging_dir=logging_dir, requeue=profile.requeue,
                         srun_args=srun_args or None, mail_type="NONE")
        self.stage = stage
        self.profile_mem = bool(profile.mem)

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        args = super().get_sbatch_args(max_array)
        if self.profile_mem:
            args.pop("mem-per-cpu", None)  # sbatch refuses --mem with --mem-per-cpu
        return args

    def launch_merge_stats(self):
        pass


def _activate_this_python() -> str:
    activate = Path(sys.prefix) / "bin" / "activate"
    return f"source {activate}" if activate.exists() else "true"


def _profile_of_this_job():
    """A profile for array jobs submitted from inside a Slurm job (the experiment's data stage): the same
    partition and account, this Python environment."""
    from jp_peft.cluster.executors import SlurmProfile

    partition = os.environ.get("SLURM_JOB_PARTITION")
    if not partition:
        raise ConfigError("--executor slurm without --slurm-profile works only inside a Slurm job (it submits "
                          "to that job's partition); name a profile: --slurm-profile NAME")
    return SlurmProfile(path="(this Slurm job)", account=os.environ.get("SLURM_JOB_ACCOUNT", ""),
                        partition=partition, gpus_per_node=0, time="24:00:00", setup=(_activate_this_python(),))


def load_data_profile(name: str | None):
    if name is None:
        return _profile_of_this_job()
    from jp_peft.cluster.executors import ProfileError, load_profile

    try:
        return load_profile(name)
    except ProfileError as exc:
        raise ConfigError(f"--slurm-profile: {exc}") from None


def executor_for(inputs) -> dict[str, Any]:
    """How the experiment's data stage prepares `inputs`: on the machine it runs on, with its usable cores;
    or, when the stage is itself a Slurm job and the inputs reach $JP_PEFT_DATA_SLURM_MIN_GB (default 1
    GB), as array jobs on that job's partition, one task per 256 MiB."""
    from jp_peft.data.pool import usable_cores
    from jp_peft.data.prepare import SHARD_BYTES

    total = sum(Path(p).stat().st_size for p in inputs)
    threshold = float(os.environ.get("JP_PEFT_DATA_SLURM_MIN_GB", "1")) * 1e9
    if os.environ.get("SLURM_JOB_ID") and total >= threshold:
        return {"executor": "slurm", "tasks": max(1, -(-total // SHARD_BYTES))}
    return {"executor": "local", "workers": usable_cores()}


# --- running the stages ----------------------------------------------------------------------------

def run_stages(stages: list[tuple[str, list, int]], plan, work: WorkDir) -> None:
    cfg = plan.cfg
    monitor = ProgressMonitor(work, plan) if cfg.progress else None
    try:
        if cfg.executor == "local":
            for name, pipeline, tasks in stages:
                LocalStageExecutor(name, pipeline, tasks, plan.workers, str(work.stage(name))).run()
        else:
            _run_on_slurm(stages, load_data_profile(cfg.slurm_profile), work)
    except WorkerError as exc:
        raise type(exc)(f"{exc}{_stopped_where(work, plan)}") from None
    finally:
        if monitor:
            monitor.stop()


def _stopped_where(work: WorkDir, plan) -> str:
    cleaned = len(work.completed("clean"))
    return f" ({cleaned} of {plan.tasks} shards were cleaned before)" if cleaned else ""


def _raise_recorded_error(work: WorkDir) -> None:
    """The first (by stage order, then rank) error a task recorded, raised here as it was there."""
    order = ["count", "clean", "buckets", "clusters", "tokenize", "merge"]
    records = sorted(work.sub("errors").glob("*.json"),
                     key=lambda p: (order.index(p.stem.split("-")[0]), p.stem))
    for path in records:
        record = WorkDir.read_json(path)
        if record and record.get("type") in RECORDED_ERRORS:
            raise RECORDED_ERRORS[record["type"]](record["message"])


@contextlib.contextmanager
def _submitting_env():
    """sbatch from inside a Slurm job (the experiment's data stage) inherits SLURM_* variables that would
    make datatrove think it is an array task, or clash with the new job's own options. SLURM_CONF stays: it
    names the cluster to submit to (the dev cluster's is not /etc/slurm's)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("SLURM_") and k != "SLURM_CONF"}
    for key in saved:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.update(saved)


def _run_on_slurm(stages, profile, work: WorkDir) -> None:
    import shutil

    if shutil.which("sbatch") is None:
        raise ConfigError("--executor slurm submits array jobs with Slurm's `sbatch`, which is not on PATH here")
    from jp_peft.cluster.executors import SlurmUnavailable, use_slurm_conf

    try:
        use_slurm_conf(profile)
    except SlurmUnavailable as exc:
        raise ConfigError(f"--slurm-profile: {exc}") from None
    for stale in work.sub("errors").glob("*.json"):
        stale.unlink()
    retried: dict[str, list[int]] = {}
    for attempt in range(SLURM_RETRIES + 1):
        executors, previous = [], None
        for name, pipeline, tasks in stages:
            previous = SlurmStageExecutor(name, pipeline, tasks, profile, str(work.stage(name)), depends=previous)
            executors.append(previous)
        with _submitting_env():
            executors[-1].run()  # submits every stage not finished yet, each after the one before
        submitted = {str(e.job_id): e for e in executors if e.job_id not in (None, -1)}  # in stage order
        try:
            _wait_for_jobs(list(submitted), lambda job: bool(submitted[job].get_incomplete_ranks()))
        except BaseException:
            subprocess.run(["scancel", *submitted], capture_output=True)
            raise
        unfinished = {e.stage: e.get_incomplete_ranks() for e in executors}
        unfinished = {stage: ranks for stage, ranks in unfinished.items() if ranks}
        if not unfinished:
            return
        _raise_recorded_error(work)
        stage, ranks = next(iter(unfinished.items()))  # the stages after it never started
        if attempt < SLURM_RETRIES:
            retried.setdefault(stage, []).extend(ranks)
            work.write_json(work.sub("retried.json"), retried)
            print(f"prepare: Slurm tasks {_ranks(ranks)} of stage {stage} did not finish: resubmitting them once",
                  file=sys.stderr, flush=True)
    executor = next(e for e in executors if e.stage == stage)
    raise SlurmTaskError(f"Slurm task {ranks[0]} of stage {stage} did not finish after {SLURM_RETRIES} "
                         f"resubmission (tasks {_ranks(ranks)} of {stage}); its log: {_slurm_log(executor, ranks[0])}")


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:10])) + (f" and {len(ranks) - 10} more" if len(ranks) > 10 else "")


def _slurm_log(executor: SlurmStageExecutor, rank: int) -> str:
    task_log = Path(executor.logging_dir.path) / "logs" / f"task_{rank:05d}.log"
    ranks = WorkDir.read_json(Path(executor.logging_dir.path) / "ranks_to_run.json", [])
    if rank in ranks and executor.job_id not in (None, -1):
        return f"{executor.slurm_logs_folder}/{executor.job_id}_{ranks.index(rank)}.out (and {task_log})"
    return str(task_log)


def _wait_for_jobs(job_ids: list[str], left_ranks_undone=lambda job: False) -> None:
    """Until none of the jobs (arrays included, `job_ids` in stage order) is pending or running.

    A stage that ended with ranks undone cancels every job after it at once: their dependencies can no
    longer be met, and Slurm would cancel them one stage per scheduler pass with `kill_invalid_depend`
    (on the dev cluster about 70 s for the five stages after `clean`, on every attempt), or never without
    it (slurm_jobs.cancel_unrunnable says why). A job whose
    dependency failed some other way shows `DependencyNeverSatisfied`: cancelled here too (squeue; no
    slurmdbd needed)."""
    from jp_peft.cluster.slurm_jobs import TERMINAL

    complete: set[str] = set()  # ended with every rank done: their completion marks are read once
    while job_ids:
        proc = subprocess.run(["squeue", "-h", "-o", "%F|%T|%r"], capture_output=True, text=True)
        rows = [line.split("|") for line in proc.stdout.splitlines() if line.count("|") == 2]
        ours = [(job, state, reason) for job, state, reason in rows if job in job_ids]
        live = [r for r in ours if r[1] not in TERMINAL]
        if not live:
            return
        live_jobs = {job for job, _, _ in live}
        for position, job in enumerate(job_ids):
            if job in live_jobs:
                break  # the stages after a live one have not run yet
            if job in complete:
                continue
            if left_ranks_undone(job):
                later = [j for j in job_ids[position + 1:] if j in live_jobs]
                subprocess.run(["scancel", *later], capture_output=True)
                return
            complete.add(job)
        never = sorted({job for job, state, reason in live
                        if state == "PENDING" and reason.startswith("DependencyNeverSatisfied")})
        if never:  # their dependents then become never satisfied in turn, and are cancelled next time round
            subprocess.run(["scancel", *never], capture_output=True)
        time.sleep(SLURM_POLL_S)


# --- progress -------------------------------------------------------------------------------------

class ProgressMonitor:
    """Sums the tasks' progress records and prints Progress lines (records read/kept/rejected, MB/s, ETA)."""

    def __init__(self, work: WorkDir, plan):
        self.work, self.plan = work, plan
        self.progress = Progress(f"prepare {Path(plan.cfg.output_prefix).name}", plan.total_bytes,
                                 plan.cfg.progress_interval)
        self.stopping = threading.Event()
        self.last: tuple | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _totals(self) -> tuple[int, int, int]:
        read = kept = done = 0
        for path in self.work.sub("progress").glob("*.json"):
            record = WorkDir.read_json(path, {})
            read += record.get("read", 0)
            kept += record.get("kept", 0)
            done += record.get("bytes", 0)
        return read, kept, done

    def _loop(self) -> None:
        while not self.stopping.wait(min(self.progress.interval / 2, 1.0)):
            totals = self._totals()
            if totals != self.last and totals[0]:
                self.last = totals
                read, kept, done = totals
                self.progress.update(read, kept, read - kept, done)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.progress.close()


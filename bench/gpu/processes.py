"""One worker process per step: its own peak memory, and an out-of-memory ends only that trial.

A worker is the entry script run with `--worker JOB` (under torchrun for Megatron); its output goes to
a log beside the job, and the lines a person follows are echoed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from bench.gpu import ENTRY, REPO, BenchError
from bench.gpu.results import is_oom


def worker_env(work_dir: Path) -> dict:
    """The workers' environment: this checkout first on the path (it runs without `pip install -e .`),
    then whatever PYTHONPATH already holds (on the device machine, the carried wheels)."""
    path = os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "NEMO_HOME": str(work_dir / "nemo_home"), "WANDB_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def echo(line: str) -> bool:
    """Which worker lines the parent shows: jp-peft's stage lines, and every 10th step line."""
    if "[jp-peft]" not in line:
        return "Error" in line and not line.startswith(" ")
    if " step " in line and "/" in line:
        try:
            done = int(line.split(" step ", 1)[1].split("/", 1)[0])
            total = int(line.split(" step ", 1)[1].split("/", 1)[1].split()[0])
        except (ValueError, IndexError):
            return True
        return done % 10 == 0 or done == total or done == 1
    return True


def run_worker(step: str, job: dict, *, jobs: Path, env: dict, timeout: float, say, torchrun: bool = False,
               hide_cuda: bool = False, oom_ok: bool = False) -> dict | None:
    """Run one job in its own process. Returns its result, or None for an out-of-memory when `oom_ok`;
    raises BenchError naming the step, with the log's last lines, otherwise."""
    jobs.mkdir(parents=True, exist_ok=True)
    slug = step.replace(" ", "_").replace("/", "_")
    job_path, log_path = jobs / f"{slug}.json", jobs / f"{slug}.log"
    job = {**job, "result": str(jobs / f"{slug}.result.json")}
    job_path.write_text(json.dumps(job, indent=1))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"] \
        if torchrun else [sys.executable]
    env = {**env, **({"CUDA_VISIBLE_DEVICES": ""} if hide_cuda else {})}
    with open(log_path, "w", encoding="utf-8") as log:
        # its own session: a timeout or Ctrl-C ends torchrun and the trainer it started, together
        proc = subprocess.Popen([*launcher, str(ENTRY), "--worker", str(job_path)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)

        def pump() -> None:
            for line in proc.stdout:
                log.write(line)
                if echo(line):
                    print(f"    {line.rstrip()}", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = f"nothing (killed after --worker-timeout {timeout:.0f} s)"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        reader.join(timeout=30)
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if code == 0 and Path(job["result"]).exists():
        return json.loads(Path(job["result"]).read_text())
    if oom_ok and is_oom(text):
        say(f"{step}: out of GPU memory (log {log_path})")
        return None
    tail = "\n".join(text.splitlines()[-60:])
    raise BenchError(f"{step}: worker exited {code}; log {log_path}; its last lines:\n{tail}")

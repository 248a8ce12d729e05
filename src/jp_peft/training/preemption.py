"""Save a checkpoint when Slurm (or anyone) asks the job to stop, so a requeued job resumes.

SIGTERM arrives on `scontrol requeue`, preemption and `scancel`; SIGUSR1 is what
`#SBATCH --signal=USR1@120` sends before the time limit. Either way the next optimizer-step
boundary writes last.ckpt (atomically) and stops training. After SIGUSR1 under Slurm the job
requeues itself; after SIGTERM Slurm already decided what happens next.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import lightning.pytorch as pl


class PreemptionCheckpoint(pl.Callback):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.received: int | None = None
        self._seen_step = -1

    def on_train_start(self, trainer, pl_module):
        self._seen_step = trainer.global_step
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        at_step_boundary = trainer.global_step != self._seen_step
        self._seen_step = trainer.global_step
        if self.received is None or not at_step_boundary:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        trainer.save_checkpoint(tmp)
        os.replace(tmp, self.path)
        print(f"jp-peft: received {signal.Signals(self.received).name}: saved {self.path} at step "
              f"{trainer.global_step}, stopping", flush=True)
        trainer.should_stop = True
        job = os.environ.get("SLURM_JOB_ID")
        if self.received == signal.SIGUSR1 and job:
            subprocess.run(["scontrol", "requeue", job], check=False)

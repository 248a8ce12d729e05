"""A stage stopped before its last step (a signal, preemption, Ctrl-C at the launcher) -- the one contract
both backends and the launcher share for it: the stage saved a checkpoint, and the same command resumes."""


class StageInterrupted(RuntimeError):
    """Training stopped at `step` of `max_steps`; its last checkpoint resumes it."""

    def __init__(self, stage: str, step: int, max_steps: int, checkpoints):
        self.stage, self.step, self.max_steps = stage, step, max_steps
        super().__init__(f"{stage}: stopped at step {step} of {max_steps}; its last checkpoint is in {checkpoints}: "
                         "run the same command again to resume")

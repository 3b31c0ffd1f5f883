"""The callable a Slurm job unpickles and runs (kept apart so tracking never imports submitit)."""

from __future__ import annotations

import subprocess

from submitit.helpers import Checkpointable, DelayedSubmission


class StepCommand(Checkpointable):
    """What a Slurm job runs: the step's launch script from the run directory, nothing else pickled.

    Training steps are Checkpointable: on USR2 before the time limit (or a preemption) submitit requeues
    the job, and the relaunched step resumes from the newest complete checkpoint.
    """

    def __init__(self, script: str, step: str, resumable: bool):
        self.script = script
        self.step = step
        self.resumable = resumable

    def __call__(self) -> str:
        completed = subprocess.run(["bash", self.script], check=False)
        if completed.returncode != 0:
            raise RuntimeError(f"step {self.step} failed: {self.script} exited with {completed.returncode}")
        return "ok"

    def checkpoint(self) -> DelayedSubmission | None:  # type: ignore[override]
        return DelayedSubmission(self) if self.resumable else None

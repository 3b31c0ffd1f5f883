"""The callable a Slurm job unpickles and runs (kept apart so tracking never imports submitit)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from submitit.helpers import Checkpointable, DelayedSubmission

from sftjobs.errors import EXIT_STOPPED  # the step saved at a signal and stopped
from sftjobs.waiting import wait_with_signals

REQUEUE_MARGIN_S = 15  # what submitit's requeue (scontrol requeue) and its exit need after the wait


class StepCommand(Checkpointable):
    """What a Slurm job runs: the step's launch script from the run directory, nothing else pickled.

    Training steps are Checkpointable: on USR2 before the time limit (or ``scancel --signal=USR2``) submitit calls
    checkpoint(), which waits here until the step has saved a checkpoint of the optimizer step it was on and
    exited (sftjobs.steps.train) — up to the signal's lead time less a margin — and only then lets submitit
    requeue the job. Waiting inside the handler is what gives the save the whole ``resources.signal_delay_s``
    instead of Slurm's KillWait after the requeue.
    """

    def __init__(self, script: str, step: str, resumable: bool, signal_delay_s: int = 90):
        self.script = script
        self.step = step
        self.resumable = resumable
        self.signal_delay_s = signal_delay_s
        self.finished = False  # set when a signal came after the step had already completed
        self._process: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "_process"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._process = None

    def __call__(self) -> str:
        if self.finished:
            return "ok (completed before the requeue)"
        self._process = subprocess.Popen(["bash", self.script])
        # submitit only logs a SIGTERM ("bypassing"), and Slurm may deliver it to this task alone (scancel,
        # scontrol requeue, preemption): pass it on, so a training step saves and any step stops now rather than
        # at the SIGKILL after KillWait
        signal.signal(signal.SIGTERM, self._pass_sigterm)
        code = wait_with_signals(self._process)
        first_task = os.environ.get("SLURM_PROCID", "0") == "0"  # one requeue for a job of several nodes
        if code != 0 and first_task and requeue_if_preempted(os.environ.get("SLURM_JOB_ID")):
            saved = "saved a checkpoint" if code == EXIT_STOPPED else f"ended with {code}"
            raise RuntimeError(f"step {self.step} {saved} when the job was preempted; the job is requeued and "
                               "runs again from where it stopped")
        if code == EXIT_STOPPED:
            raise RuntimeError(f"step {self.step} stopped on a signal after saving a checkpoint; the job is requeued "
                               "(time limit, preemption) or was cancelled, and a resume continues from it")
        if code != 0:
            raise RuntimeError(f"step {self.step} failed: {self.script} exited with {code}")
        return "ok"

    def _pass_sigterm(self, signum: int, _frame) -> None:
        process = self._process
        if process is not None and process.returncode is None:
            try:
                os.kill(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _wait_for_step(self) -> int | None:
        """Pass USR2 on to the step and wait until it has exited; its exit code, or None if it is still running at
        the deadline. Runs inside submitit's signal handler, which interrupted the wait in __call__: the child is reaped with
        os.waitpid here (Popen's own wait/poll would find the lock the interrupted wait holds and report nothing);
        submitit exits after the handler, so the interrupted wait never resumes."""
        process = self._process
        if process is None:
            return None
        if process.returncode is not None:
            return process.returncode
        try:
            os.kill(process.pid, signal.SIGUSR2)  # Slurm may have signalled only this task's leader
        except ProcessLookupError:
            return None
        deadline = time.monotonic() + max(self.signal_delay_s - REQUEUE_MARGIN_S, 5)
        while time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(process.pid, os.WNOHANG)
            except ChildProcessError:  # reaped meanwhile by the interrupted wait
                return process.returncode
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.5)
        return None

    def checkpoint(self) -> DelayedSubmission | None:  # type: ignore[override]
        if not self.resumable:
            return None
        code = self._wait_for_step()
        if code == 0:
            # the step completed while the signal was on its way: the requeued job only reports success
            self.finished = True
        return DelayedSubmission(self)


def scontrol_fields(*args: str) -> dict[str, str]:
    """``scontrol show ... --oneliner`` as KEY=VALUE pairs (what no sub-command prints is empty)."""
    try:
        out = subprocess.run(["scontrol", "show", *args, "--oneliner"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def requeue_if_preempted(job_id: str | None) -> bool:
    """After a step ended early (a training step saved at the SIGTERM; any other step stopped by it): if Slurm
    picked this job for preemption (PreemptTime set) and its partition requeues preempted jobs (PreemptMode
    REQUEUE; the job not --no-requeue), requeue it now and say so.

    A job that ends by itself within the preemption's GraceTime is not requeued by Slurm: it ends FAILED, as if the
    step had failed, and its dependants are never started. Requeueing it here keeps the job id, the afterok chain
    and the checkpoint just saved (the requeued job skips the steps it completed), and frees the node before the
    grace time is up. Under PreemptMode CANCEL (or a SIGTERM that was no preemption: scancel, scontrol requeue)
    nothing is done here."""
    if not job_id:
        return False
    job = scontrol_fields("job", job_id)
    if job.get("PreemptTime", "None") in ("None", "Unknown", "") or job.get("Requeue") != "1":
        return False
    mode = scontrol_fields("partition", job.get("Partition", "")).get("PreemptMode", "")
    if "REQUEUE" not in mode.upper().split(","):
        return False
    print(f"sftjobs: job {job_id} was preempted (PreemptTime {job['PreemptTime']}, partition "
          f"{job.get('Partition')} PreemptMode {mode}); requeueing it", flush=True)
    return subprocess.run(["scontrol", "requeue", job_id], capture_output=True, timeout=30).returncode == 0

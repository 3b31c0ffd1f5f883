"""Waiting for a child process without deafening this one to signals."""

from __future__ import annotations

import subprocess

WAIT_SLICE_S = 0.5


def wait_with_signals(process: subprocess.Popen) -> int:
    """Popen.wait() in short slices; the child's exit code.

    A signal sent to a process may be delivered to any of its threads (the job's processes have several: submitit's,
    torch's, the monitor's). Python runs the handler in the main thread at its next bytecode, so a main thread
    blocked in one long waitpid() or read() would not get there until the child had exited or written a line: the
    SIGTERM of a requeue or a preemption would reach the training only at the SIGKILL after KillWait, with nothing
    saved. Waiting in slices bounds that delay to a slice."""
    while True:
        try:
            return process.wait(timeout=WAIT_SLICE_S)
        except subprocess.TimeoutExpired:
            continue

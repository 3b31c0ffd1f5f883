"""A stop signal reaches the training however the kernel delivers it.

Slurm signals a job's task leader (submitit's process) on a requeue or a preemption; submitit's process passes it
on to the step's runtime, which passes it on to the training processes as USR2. A signal sent to a process may be
delivered to any of its threads, and both processes have several. Python runs the handler only in the main
thread: a main thread blocked in one long wait (waitpid for the child, read for a silent child's next line)
would run it only once the child exited or wrote a line, so the training would see the signal only at the
SIGKILL after KillWait, with nothing saved. Here the signal goes to a thread other than the main one
(pthread_kill), and the child, which writes nothing, must receive it within seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# the signal goes to a helper thread of the process under test, after the child has started
SIGNAL_FROM_A_THREAD = """
import signal, threading, time

def send_from_this_thread():
    time.sleep(1.5)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

threading.Thread(target=send_from_this_thread, daemon=True).start()
"""


def run_python(code: str, tmp_path: Path, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
    return result, time.monotonic() - start


def test_the_task_leader_passes_sigterm_on_when_another_thread_receives_it(tmp_path):
    """submitit's process (StepCommand) forwards SIGTERM to the step although a helper thread got it."""
    got = tmp_path / "got-term"
    script = tmp_path / "step.sh"
    # the step: silent, 30 s, records the SIGTERM it gets and stops
    script.write_text(f"trap 'echo TERM > {got}; kill $pid; exit 0' TERM\nsleep 30 >/dev/null 2>&1 &\npid=$!\nwait\n")
    code = SIGNAL_FROM_A_THREAD + textwrap.dedent(f"""
        from sftjobs.executors.slurm_job import StepCommand
        print(StepCommand({str(script)!r}, "train", resumable=False)())
    """)
    result, seconds = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert got.read_text().strip() == "TERM"
    assert seconds < 10, f"the step got the SIGTERM only after {seconds:.1f} s"


def test_the_runtime_relays_a_stop_signal_to_a_silent_training(tmp_path):
    """The train step's runtime (run_training_process) sends USR2 to a training process that writes nothing,
    although a helper thread got the SIGTERM."""
    got = tmp_path / "got-usr2"
    training = tmp_path / "training.py"
    training.write_text(textwrap.dedent(f"""
        import pathlib, signal, sys, time
        def stop(signum, frame):
            pathlib.Path({str(got)!r}).write_text(signal.Signals(signum).name)
            sys.exit(0)
        signal.signal(signal.SIGUSR2, stop)
        print("training", flush=True)
        time.sleep(30)
    """))
    code = SIGNAL_FROM_A_THREAD + textwrap.dedent(f"""
        import json, os, pathlib, sys
        from sftjobs.steps.train import run_training_process
        tmp = pathlib.Path({str(tmp_path)!r})
        code, received = run_training_process([sys.executable, {str(training)!r}], dict(os.environ),
                                              tmp / "training.log", tmp / "monitor.jsonl", tmp, print, None)
        print(json.dumps({{"code": code, "received": received}}))
    """)
    result, seconds = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"code": 0, "received": "SIGTERM"}
    assert got.read_text() == "SIGUSR2"
    assert seconds < 10, f"the training got USR2 only after {seconds:.1f} s"
    # its output still reaches the training log and this job's log
    assert (tmp_path / "training.log").read_text() == "training\n"
    assert "training\n" in result.stdout

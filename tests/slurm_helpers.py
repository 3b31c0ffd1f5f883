"""Helpers for tests against the real Slurm test cluster (tests/slurm/start-slurm.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
FAKE_PYTHON = HERE / "slurm" / "fake_step_python.sh"
# the stand-in steps run sftjobs' node runtime with the python that runs the tests (sbatch passes the environment on)
os.environ.setdefault("SFTJOBS_FAKE_REAL_PYTHON", sys.executable)
os.environ.setdefault("SFTJOBS_FAKE_STEPS", str(HERE / "slurm" / "fake_steps.py"))
# Fit the test cluster's nodes (8 CPUs, 8000 MB, 8 fake GPUs each).
SMALL = ["resources.cpus_per_task=2", "resources.mem=500M", "resources.cpu_step_cpus=1",
         "resources.cpu_step_mem=300M", "resources.time=00:10:00", "resources.cpu_step_time=00:10:00"]


def slurm_ready() -> bool:
    if shutil.which("sbatch") is None:
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return result.returncode == 0 and any(s in result.stdout for s in ("idle", "mix", "alloc"))


def scontrol_show(kind: str, name: str) -> dict[str, str]:
    """``scontrol -o show KIND NAME`` as its KEY=VALUE fields."""
    out = subprocess.run(["scontrol", "-o", "show", kind, name], capture_output=True, text=True, check=True).stdout
    fields = {}
    for token in out.split():
        key, _, value = token.partition("=")
        fields[key] = value
    return fields


def scontrol_job(job_id: str) -> dict[str, str]:
    return scontrol_show("job", job_id)


def scontrol_partition(name: str) -> dict[str, str]:
    return scontrol_show("partition", name)


def sacct_field(job_id: str, field: str) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", field, "-j", job_id], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out.strip() else ""


def settled_sacct_state(job_id: str, timeout: float = 60) -> str:
    """The job's State in accounting once it is final: slurmctld hands a job's end to slurmdbd asynchronously,
    so sacct can still say PENDING or RUNNING for a moment after squeue and sftjobs saw the job end."""
    return wait_until(lambda: (state := sacct_field(job_id, "State")) not in ("", "PENDING", "RUNNING") and state,
                      timeout, 1.0, f"job {job_id}'s final state in sacct")


def wait_until(predicate, timeout: float, interval: float = 1.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def preempt_node(partition: str, node: str, seconds: int = 15) -> str:
    """Another user's job in ``partition`` (of a higher PriorityTier) that takes all of ``node`` for ``seconds``:
    Slurm preempts what runs there. Its job id."""
    out = subprocess.run(["sbatch", "--parsable", f"--partition={partition}", f"--nodelist={node}", "--exclusive",
                          "--time=2", "--job-name=someone-else", "--output=/dev/null", f"--wrap=sleep {seconds}"],
                         check=True, capture_output=True, text=True).stdout
    return out.strip().split(";")[0]

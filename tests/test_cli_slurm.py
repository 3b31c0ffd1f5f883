"""The command line on the real Slurm test cluster (issue 19): NODELIST(REASON) as squeue / sacct show it,
job names squeue's default 8-character column tells apart."""

from __future__ import annotations

import getpass
import subprocess
import time

import pytest

from sftjobs.cli import main
from tests.slurm_helpers import wait_until
from tests.test_slurm_chain import all_done, states, submit

pytestmark = pytest.mark.slurm


def table_rows(capsys, run_id: str) -> dict[str, str]:
    """step -> its NODELIST(REASON) cell in the default (80-column) table, the last column as in squeue."""
    assert main(["status", run_id]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("STEP "))
    start = header.index("NODELIST(REASON)")
    rows = lines[lines.index(header) + 1:]
    return {line.split()[0]: line[start:].strip() for line in rows if not line.startswith(("note:", "run "))}


def test_nodelist_of_finished_cancelled_and_pending_steps(slurm, in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "20")
    manifest = submit(capsys, "toy")
    run_id, jobs = manifest["run_id"], manifest["jobs"]
    # squeue's default format shows 8 characters of the name: every step of the run reads apart there
    names = subprocess.run(["squeue", "-h", "-j", ",".join(jobs.values()), "-o", "%i %.8j"], capture_output=True,
                           text=True, check=True).stdout.split()
    shown = dict(zip(names[::2], names[1::2], strict=True))
    assert len(set(shown.values())) == len(set(jobs.values())) and shown[jobs["train"]] == f"trn-{run_id[-4:]}"
    # while data and model run, the waiting steps show squeue's reason
    wait_until(lambda: states(capsys, run_id)["preflight"] == "PENDING" and states(capsys, run_id)["data"] == "RUNNING",
               60, 1, "data to start")
    where = table_rows(capsys, run_id)
    assert where["preflight"] == where["train"] == "(Dependency)"
    assert where["data"] in ("n1", "n2")
    # preflight runs (in the training job) after waiting on a dependency (sacct keeps Reason=Dependency); the job is
    # cancelled then: train never starts in it
    wait_until(lambda: states(capsys, run_id)["preflight"] == "RUNNING", 90, 1, "preflight to start")
    time.sleep(2)  # a cancel within its first second would read "as it started" (elapsed 0:00)
    subprocess.run(["scancel", jobs["train"]], check=True)
    wait_until(lambda: all_done(capsys, run_id), 120, 2, "the chain to end")
    where = table_rows(capsys, run_id)
    assert where["data"] in ("n1", "n2") and where["model"] in ("n1", "n2")
    assert where["preflight"] in ("n1", "n2"), where  # not the stale (Dependency)
    assert where["train"] == where["validate"] == "None assigned", where
    # the note names the run and says what happened, in words (not "CANCELLED by 0")
    assert main(["status", run_id]) == 0
    out = capsys.readouterr().out
    assert f"note: run {run_id}: step preflight was cancelled by {getpass.getuser()} after " in out, out
    assert "; train, validate did not run." in out and " by 0" not in out


def test_failure_note_quotes_the_step_not_submitit(slurm, in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_STEP", "data")
    manifest = submit(capsys, "toy")
    run_id = manifest["run_id"]
    wait_until(lambda: all_done(capsys, run_id), 120, 2, "the chain to end")
    assert main(["status", run_id]) == 0
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert note == [f"note: run {run_id}: step data failed with exit code 1 (fake failure in data); preflight, train, "
                    f"validate did not run. `sftjobs logs {run_id} data` shows its log."]

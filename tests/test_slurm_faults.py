"""Faults on the real Slurm test cluster: the controller restarting under a chain, resume of the steps that
did not complete, a second submit into a busy output_dir, --time over the partition's MaxTime, a preempted
validation job."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from sftjobs.cli import main
from sftjobs.runs import read_manifest
from tests.slurm_helpers import FAKE_PYTHON, SMALL, preempt_node, sacct_field, scontrol_job, wait_until
from tests.test_slurm_chain import all_done, status_json, submit

pytestmark = pytest.mark.slurm
CTLD_PID = Path("/run/slurm/slurmctld.pid")


def controller_up() -> bool:
    return subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout.count("UP") > 0


def test_controller_restart_under_a_chain(slurm, in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "15")
    manifest = submit(capsys, "toy")
    jobs = manifest["jobs"]
    # data and model have no dependency and start together; a step's srun asks the controller to confirm its
    # allocation as it starts, so the controller goes down only once both are well under way
    wait_until(lambda: all(scontrol_job(jobs[s])["JobState"] == "RUNNING" for s in ("data", "model")), 60, 0.5,
               "data and model running")
    time.sleep(4)
    pid = int(CTLD_PID.read_text())
    os.kill(pid, 15)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30, 0.2, "slurmctld to stop")
    try:
        report = status_json(capsys, manifest["run_id"])  # must not crash while the controller is down
        assert any("slurmctld unreachable" in note for note in report["notes"]), report["notes"]
    finally:
        subprocess.run(["/usr/sbin/slurmctld"], check=True)
        wait_until(controller_up, 60, 0.5, "slurmctld back")
    final = wait_until(lambda: all_done(capsys, manifest["run_id"]), 240, 2, "the chain after the restart")
    assert set(final.values()) == {"COMPLETED"}, final


def test_resume_resubmits_only_what_did_not_complete(slurm, in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_STEP", "preflight")
    manifest = submit(capsys, "toy")
    run_id, first_jobs = manifest["run_id"], manifest["jobs"]
    final = wait_until(lambda: all_done(capsys, run_id), 120, 2, "the failing chain")
    assert final["preflight"] == "FAILED" and final["data"] == "COMPLETED"
    monkeypatch.delenv("FAKE_FAIL_STEP")
    assert main(["resume", run_id]) == 0
    out = capsys.readouterr().out
    assert "resubmitted preflight, train, validate" in out
    manifest = read_manifest(Path(os.environ["SFTJOBS_JOBS_DIR"]) / run_id)
    assert manifest["jobs"]["data"] == first_jobs["data"] and manifest["jobs"]["model"] == first_jobs["model"]
    assert manifest["jobs"]["preflight"] != first_jobs["preflight"]
    assert "Dependency" not in scontrol_job(manifest["jobs"]["preflight"]).get("Dependency", "") or \
        scontrol_job(manifest["jobs"]["preflight"])["Dependency"] == "(null)"
    final = wait_until(lambda: all_done(capsys, run_id), 120, 2, "the resumed chain")
    assert set(final.values()) == {"COMPLETED"}, final
    assert main(["resume", run_id]) == 0
    assert "nothing to resume" in capsys.readouterr().out


def test_second_submit_into_a_busy_output_dir_is_refused(slurm, in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "20")
    manifest = submit(capsys, "toy")
    args = ["submit", "toy", "--executor", "slurm", "--set", f"launcher.python={FAKE_PYTHON}"]
    for item in SMALL:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert manifest["run_id"] in err and "clobber" in err
    assert len(list(Path(os.environ["SFTJOBS_JOBS_DIR"]).iterdir())) == 1  # nothing written for the refused one
    assert main(["cancel", manifest["run_id"]]) == 0


def test_time_over_partition_max_is_flagged_at_submit(slurm, in_tmp, capsys):
    args = ["submit", "toy", "--executor", "slurm", "--set", "resources.partition=short",
            "--set", "resources.time=02:00:00", "--set", f"launcher.python={FAKE_PYTHON}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "MaxTime" in err and "partition short" in err and "10 minutes" in err
    before = subprocess.run(["squeue", "-h", "-p", "short"], capture_output=True, text=True).stdout
    assert before.strip() == ""


def test_status_shows_restarts_after_a_requeue(slurm, in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "15")
    manifest = submit(capsys, "toy", sets=["resources.cpus_per_task=1"])
    job = manifest["jobs"]["data"]
    wait_until(lambda: scontrol_job(job)["JobState"] == "RUNNING", 60, 0.5, "data running")
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_until(lambda: sacct_field(job, "State") in ("RUNNING", "COMPLETED") and
               int(scontrol_job(job).get("Restarts", "0")) >= 1, 120, 1, "the requeued job to run again")
    final = wait_until(lambda: all_done(capsys, manifest["run_id"]), 240, 2, "the chain")
    assert set(final.values()) == {"COMPLETED"}, final
    assert main(["status", manifest["run_id"]]) == 0
    table = capsys.readouterr().out
    assert "COMPLETED[1]" in table  # one restart, shown as squeue-style state[restarts]
    time.sleep(0)


def test_a_preempted_validation_is_requeued_and_runs_again(urgent_partition, in_tmp, capsys, monkeypatch):
    # a step that is not training has nothing to save: SIGTERM ends it at once, within the GraceTime, and Slurm
    # would then record the job FAILED instead of requeueing it; the job's task requeues it itself
    monkeypatch.setenv("FAKE_SLEEP_VALIDATE", "20")
    manifest = submit(capsys, "toy")
    validate = manifest["jobs"]["validate"]
    wait_until(lambda: scontrol_job(validate)["JobState"] == "RUNNING", 180, 0.5, "validate running")
    time.sleep(3)
    preempt_node(urgent_partition, scontrol_job(validate)["NodeList"], seconds=5)
    final = wait_until(lambda: all_done(capsys, manifest["run_id"]), 240, 2, "the chain after the preemption")
    assert set(final.values()) == {"COMPLETED"}, final
    assert int(scontrol_job(validate).get("Restarts", "0")) == 1
    run_dir = Path(os.environ["SFTJOBS_JOBS_DIR"]) / manifest["run_id"]
    launches = [line for line in (run_dir / "fake" / "runs.log").read_text().splitlines() if line.startswith("validate")]
    assert [line.split()[-1] for line in launches] == ["0", "1"], launches
    log = (run_dir / "slurm" / "validate" / f"{validate}_0_log.out").read_text()
    assert f"sftjobs: job {validate} was preempted (PreemptTime" in log

"""Steps that share a Slurm job, on the real test cluster: the dry run's job runs preflight, the dry run and its
validation on its own node (one job id, each step its own row and state); a preflight failure there stops the job
before it trains; the full run's job checks its own node first; the final validation asks for one GPU; a requeued
job runs preflight again and does not run again what it completed. The steps are stand-ins
(tests/slurm/fake_steps.py) run by sftjobs' real node runtime; Slurm's side is real."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.slurm_helpers import sacct_field, scontrol_job, settled_sacct_state, wait_until
from tests.test_slurm_chain import all_done, status_json, submit

pytestmark = pytest.mark.slurm


def rows(capsys, run_id: str) -> dict[str, dict]:
    return {row["step"]: row for row in status_json(capsys, run_id)["steps"]}


def runs_log(run_dir: Path) -> list[str]:
    path = run_dir / "fake" / "runs.log"
    return path.read_text().splitlines() if path.exists() else []


def test_dry_run_job_runs_preflight_training_and_validation(slurm, in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "6")
    manifest = submit(capsys, "prod", "--dry-run-first")
    run_id, jobs = manifest["run_id"], manifest["jobs"]
    run_dir = Path(os.environ["SFTJOBS_JOBS_DIR"]) / run_id
    job = jobs["dry_run"]
    assert jobs["preflight"] == job == jobs["validate_dry_run"]

    # while the one job runs: preflight done, the dry run training, its validation waiting in the job
    def training():
        current = rows(capsys, run_id)
        return current if current["dry_run"]["state"] == "RUNNING" else None

    current = wait_until(training, 120, 0.5, "the dry run to train")
    assert current["preflight"]["state"] == "COMPLETED" and current["preflight"]["job_id"] == job
    assert current["validate_dry_run"]["state"] == "PENDING" and current["validate_dry_run"]["reason"] == "InJob"
    assert current["validate_dry_run"]["job_id"] == job
    assert scontrol_job(job)["JobState"] == "RUNNING"
    assert current["train"]["state"] == "PENDING" and current["train"]["reason"] == "Dependency"

    final = wait_until(lambda: all_done(capsys, run_id), 240, 2, "the chain to finish")
    assert set(final.values()) == {"COMPLETED"}, final
    # one Slurm job ran the three steps in order on one node, once each
    order = [line.split()[0] for line in runs_log(run_dir)]
    assert order == ["data", "model", "preflight", "dry_run", "validate_dry_run", "train_preflight", "train",
                     "validate"] or order[:2] == ["model", "data"] and order[2:] == ["preflight", "dry_run",
                                                                                      "validate_dry_run",
                                                                                      "train_preflight", "train",
                                                                                      "validate"]
    assert {line.split()[4] for line in runs_log(run_dir) if line.split()[0] in ("preflight", "dry_run",
                                                                                "validate_dry_run")} == {job}
    # the full run's job checked its own node before training (the same checks, its own report)
    assert {line.split()[4] for line in runs_log(run_dir) if line.split()[0] in ("train_preflight", "train")} == \
        {jobs["train"]}
    assert settled_sacct_state(job) == "COMPLETED" and "gres/gpu=8" in sacct_field(job, "AllocTRES")
    final_rows = rows(capsys, run_id)
    for step in ("preflight", "dry_run", "validate_dry_run"):
        assert final_rows[step]["job_id"] == job and final_rows[step]["nodelist"] == sacct_field(job, "NodeList")
    # the final validation: one GPU, a few CPUs, not the whole node
    validate = jobs["validate"]
    alloc = sacct_field(validate, "AllocTRES")
    assert "gres/gpu=1" in alloc and "cpu=1," in alloc, alloc
    assert scontrol_job(validate)["OverSubscribe"] != "NO"  # not --exclusive
    assert scontrol_job(jobs["train"])["OverSubscribe"] == "NO"  # the training takes the whole node


def test_preflight_failure_stops_the_gpu_job_before_training(slurm, in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_STEP", "preflight")
    manifest = submit(capsys, "prod", "--dry-run-first")
    run_id, jobs = manifest["run_id"], manifest["jobs"]
    run_dir = Path(os.environ["SFTJOBS_JOBS_DIR"]) / run_id
    final = wait_until(lambda: all_done(capsys, run_id), 180, 2, "the chain to end")
    assert final["data"] == final["model"] == "COMPLETED"
    assert final["preflight"] == "FAILED"
    for step in ("dry_run", "validate_dry_run", "train", "validate"):
        assert final[step] == "CANCELLED", final
    report = status_json(capsys, run_id)
    by_step = {row["step"]: row for row in report["steps"]}
    assert "preflight failed in this job: fake failure in preflight" in by_step["dry_run"]["reason"]
    assert by_step["preflight"]["exit_code"] == "2:0"
    note = " ".join(report["notes"])
    assert "step preflight failed with exit code 2 (fake failure in preflight); dry_run, validate_dry_run, train, " \
           "validate did not run." in note, note
    # the job stopped before training: the dry run never started, the job itself FAILED (not cancelled)
    assert [line.split()[0] for line in runs_log(run_dir)][-1] == "preflight"
    assert not (run_dir / "fake" / "dry_run.0.env").exists()
    assert settled_sacct_state(jobs["dry_run"]) == "FAILED"
    assert settled_sacct_state(jobs["train"]).startswith("CANCELLED")  # cancelled by the failed step itself


def test_full_run_checks_its_own_node_first(slurm, in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_STEP", "train_preflight")
    manifest = submit(capsys, "prod", "--dry-run-first")
    run_id = manifest["run_id"]
    run_dir = Path(os.environ["SFTJOBS_JOBS_DIR"]) / run_id
    final = wait_until(lambda: all_done(capsys, run_id), 180, 2, "the chain to end")
    assert final["validate_dry_run"] == "COMPLETED" and final["train"] == "FAILED" and final["validate"] == "CANCELLED"
    note = " ".join(status_json(capsys, run_id)["notes"])
    assert "step train failed with exit code 2 (pre-flight on " in note and "before training: fake failure" in note
    assert not (run_dir / "fake" / "train.0.env").exists()  # it never trained


def test_requeue_reruns_preflight_and_skips_what_completed(slurm, in_tmp, capsys, monkeypatch):
    """The dry run's job requeued (scontrol requeue) while its validation runs: preflight runs again (on the node the
    job lands on), the dry run's training, completed, does not; the validation the requeue killed runs again.
    (A step whose record says COMPLETED is never run again: tests/test_job_steps.py, without Slurm's timing.)"""
    monkeypatch.setenv("FAKE_SLEEP", "6")
    monkeypatch.setenv("FAKE_SLEEP_VALIDATE_DRY_RUN", "40")  # longer than KillWait: the requeue kills it
    manifest = submit(capsys, "prod", "--dry-run-first")
    run_id, jobs = manifest["run_id"], manifest["jobs"]
    run_dir = Path(os.environ["SFTJOBS_JOBS_DIR"]) / run_id
    wait_until(lambda: rows(capsys, run_id)["validate_dry_run"]["state"] == "RUNNING", 180, 0.5,
               "the dry run's validation to run")
    subprocess.run(["scontrol", "requeue", jobs["dry_run"]], check=True)
    final = wait_until(lambda: all_done(capsys, run_id), 300, 2, "the chain to finish")
    assert set(final.values()) == {"COMPLETED"}, final
    assert rows(capsys, run_id)["dry_run"]["restarts"] == 1  # the job's restart count, on each of its rows
    launches = [line.split() for line in runs_log(run_dir)]
    of = {step: [line[6] for line in launches if line[0] == step] for step in ("preflight", "dry_run", "validate_dry_run")}
    assert of["preflight"] == ["0", "1"] and of["dry_run"] == ["0"] and of["validate_dry_run"] == ["0", "1"], launches


def launches_by_node(run_dir: Path) -> dict[str, list[str]]:
    """step -> the node ranks it ran on, in order."""
    found: dict[str, list[str]] = {}
    for line in runs_log(run_dir):
        fields = line.split()
        found.setdefault(fields[0], []).append(fields[2])
    return found


def test_two_node_job_checks_on_the_first_node_and_trains_on_both(slurm, in_tmp, capsys, monkeypatch):
    """A two-node dry run: the pre-flight checks and the validation run on the first node only; the second node
    waits for the checks' verdict, then both train."""
    monkeypatch.setenv("FAKE_SLEEP", "3")
    monkeypatch.setenv("SFTJOBS_ALLOW_LOOPBACK_MASTER", "1")  # n1/n2 share this host (tests/test_slurm_chain.py)
    manifest = submit(capsys, "prod", "--dry-run-first", sets=["resources.nodes=2"])
    run_id, jobs = manifest["run_id"], manifest["jobs"]
    run_dir = Path(os.environ["SFTJOBS_JOBS_DIR"]) / run_id
    final = wait_until(lambda: all_done(capsys, run_id), 300, 2, "the chain to finish")
    assert set(final.values()) == {"COMPLETED"}, final
    nodes = launches_by_node(run_dir)
    assert nodes["preflight"] == ["0"] and nodes["validate_dry_run"] == ["0"], nodes
    assert sorted(nodes["dry_run"]) == ["0", "1"] and sorted(nodes["train"]) == ["0", "1"], nodes
    assert nodes["train_preflight"] == ["0"], nodes  # the full run's node checks: its first node too
    assert sacct_field(jobs["dry_run"], "NNodes") == "2"
    # the second node started training only after the first node's checks had passed
    records = {line.split()[0] + "." + line.split()[2]: i for i, line in enumerate(runs_log(run_dir))}
    assert records["preflight.0"] < records["dry_run.1"] and records["train_preflight.0"] < records["train.1"]


def test_two_node_job_stops_on_both_nodes_when_the_first_nodes_checks_fail(slurm, in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_STEP", "preflight")
    monkeypatch.setenv("SFTJOBS_ALLOW_LOOPBACK_MASTER", "1")
    manifest = submit(capsys, "prod", "--dry-run-first", sets=["resources.nodes=2"])
    run_id = manifest["run_id"]
    run_dir = Path(os.environ["SFTJOBS_JOBS_DIR"]) / run_id
    final = wait_until(lambda: all_done(capsys, run_id), 180, 2, "the chain to end")
    assert final["preflight"] == "FAILED" and final["dry_run"] == "CANCELLED", final
    assert launches_by_node(run_dir) == {"data": ["0"], "model": ["0"], "preflight": ["0"]}
    # neither node trained (the second stops on the failed verdict, or srun ends its task when the first one fails)
    assert not list((run_dir / "fake").glob("dry_run.*.env"))

"""Steps that share a job (fast tier): the plan's jobs, each step's row from its own record, and the node runtime
running a job's steps in order, skipping what a requeued job already completed."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from sftjobs.executors.base import StepState
from sftjobs.planning.dag import build_plan
from sftjobs.profile import load_profile
from sftjobs.status import steps_in_job
from tests.conftest import run_cli
from tests.slurm_helpers import FAKE_PYTHON


def test_prod_plan_waits_for_a_gpu_node_once_per_training():
    plan = build_plan(load_profile("prod", []), dry_run_first=True)
    assert [s.name for s in plan.steps] == ["data", "model", "preflight", "dry_run", "validate_dry_run", "train",
                                            "validate"]
    assert plan.job_hosts() == ["data", "model", "dry_run", "train", "validate"]
    assert [s.name for s in plan.job_steps("dry_run")] == ["preflight", "dry_run", "validate_dry_run"]
    assert plan.job_after("dry_run") == ["data", "model"] and plan.job_after("train") == ["dry_run"]
    assert plan.step("train").preflight and not plan.step("dry_run").preflight  # the full run checks its own node
    gpu_jobs = [h for h in plan.job_hosts() if plan.step(h).resources.gpus_per_node == 8]
    assert gpu_jobs == ["dry_run", "train"]  # two waits for an 8-GPU node, not five
    validate = plan.step("validate").resources
    assert (validate.gpus_per_node, validate.exclusive, validate.nodes) == (1, False, 1)
    assert (validate.cpus_per_task, validate.mem) == (4, "16G")  # the CPU steps' size (resources.cpu_step_*)
    plain = build_plan(load_profile("prod", []))
    assert [s.name for s in plain.job_steps("train")] == ["preflight", "train"] and not plain.step("train").preflight
    assert plain.job_after("train") == ["data", "model"] and plain.job_after("validate") == ["train"]


def test_cpu_only_profile_validates_without_a_gpu():
    plan = build_plan(load_profile("demo", []))
    assert plan.step("validate").resources.gpus_per_node == 0


def _job(state: str, reason: str = "", nodelist: str = "n1") -> dict[str, StepState]:
    return {name: StepState(state, reason=reason, nodelist=nodelist, exit_code="0:0" if state == "COMPLETED" else "",
                            nodes=1)
            for name in ("preflight", "dry_run", "validate_dry_run")}


def _records(tmp_path: Path, **states: str) -> Path:
    folder = tmp_path / "reports" / "status"
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for name, state in states.items():
        record = {"step": name, "state": state, "job_id": "7", "restart": 0, "started": now - 10}
        if state in ("COMPLETED", "FAILED", "CANCELLED"):
            record.update(ended=now - 5, exit_code=0 if state == "COMPLETED" else 2,
                          message="preflight failed in this job: bad node" if state == "CANCELLED" else "bad node")
        (folder / f"{name}.json").write_text(json.dumps(record))
    return tmp_path


NAMES = ["preflight", "dry_run", "validate_dry_run"]


def _words(result: dict[str, StepState]) -> list[tuple[str, str]]:
    return [(result[n].state, result[n].reason) for n in NAMES]


def test_rows_of_a_waiting_job_show_its_wait(tmp_path):
    assert _words(steps_in_job(tmp_path, NAMES, _job("PENDING", "Resources", ""))) == [("PENDING", "Resources")] * 3


def test_rows_of_a_running_job_come_from_the_records(tmp_path):
    run_dir = _records(tmp_path, preflight="COMPLETED", dry_run="RUNNING", validate_dry_run="PENDING")
    result = steps_in_job(run_dir, NAMES, _job("RUNNING"))
    assert _words(result) == [("COMPLETED", ""), ("RUNNING", ""), ("PENDING", "InJob")]
    assert result["preflight"].elapsed == "0:05" and result["validate_dry_run"].where() == "(InJob)"


def test_rows_of_a_job_stopped_by_its_preflight(tmp_path):
    run_dir = _records(tmp_path, preflight="FAILED", dry_run="CANCELLED", validate_dry_run="CANCELLED")
    result = steps_in_job(run_dir, NAMES, _job("FAILED"))
    assert [result[n].state for n in NAMES] == ["FAILED", "CANCELLED", "CANCELLED"]
    assert result["preflight"].exit_code == "2:0" and "preflight failed in this job" in result["dry_run"].reason
    assert result["preflight"].where() == "n1" and result["dry_run"].where() == "None assigned"  # it never ran


def test_rows_of_a_job_that_ended_under_a_step(tmp_path):
    run_dir = _records(tmp_path, preflight="COMPLETED", dry_run="RUNNING", validate_dry_run="PENDING")
    result = steps_in_job(run_dir, NAMES, _job("TIMEOUT"))
    assert [result[n].state for n in NAMES] == ["COMPLETED", "TIMEOUT", "CANCELLED"]
    requeued = steps_in_job(run_dir, NAMES, _job("PENDING", "BeginTime", ""))  # requeued: waits again
    assert _words(requeued) == [("COMPLETED", ""), ("PENDING", "BeginTime"), ("PENDING", "BeginTime")]


def test_rows_of_a_job_that_died_before_the_runtime(tmp_path):
    result = steps_in_job(tmp_path, NAMES, _job("FAILED"), host="dry_run")  # e.g. in its launch script
    assert [result[n].state for n in NAMES] == ["CANCELLED", "FAILED", "CANCELLED"]
    assert [r.state for r in steps_in_job(tmp_path, NAMES, _job("COMPLETED")).values()] == ["COMPLETED"] * 3
    assert [r.state for r in steps_in_job(tmp_path, NAMES, _job("CANCELLED")).values()] == ["CANCELLED"] * 3


@pytest.fixture
def dry_run_dir(in_tmp) -> Path:
    out = in_tmp / "run"
    result = run_cli("render", "toy", "--dry-run-first", "--out", str(out), "--set", f"launcher.python={FAKE_PYTHON}",
                     cwd=in_tmp)
    assert result.returncode == 0, result.stderr
    return out


def _launch(run_dir: Path, job: str, restart: int, **env: str) -> subprocess.CompletedProcess:
    full = {key: value for key, value in os.environ.items() if key != "SLURM_NODEID"}
    full.update({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": str(restart), **env})
    return subprocess.run(["bash", str(run_dir / "steps" / f"{job}.sh")], env=full, capture_output=True, text=True,
                          timeout=120)


def _launched(run_dir: Path) -> list[str]:
    path = run_dir / "fake" / "runs.log"
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


def test_a_job_runs_its_steps_in_order_and_a_relaunch_skips_what_completed(dry_run_dir):
    first = _launch(dry_run_dir, "dry_run", 0)
    assert first.returncode == 0, first.stderr
    assert _launched(dry_run_dir) == ["preflight", "dry_run", "validate_dry_run"]
    records = {n: json.loads((dry_run_dir / "reports" / "status" / f"{n}.json").read_text()) for n in NAMES}
    assert {r["state"] for r in records.values()} == {"COMPLETED"} and {r["job"] for r in records.values()} == {"dry_run"}
    # a requeue after the job's steps completed (e.g. in Slurm's KillWait): preflight checks the new node again,
    # nothing else runs again
    again = _launch(dry_run_dir, "dry_run", 1)
    assert again.returncode == 0, again.stderr
    assert _launched(dry_run_dir)[3:] == ["preflight"]
    assert "step validate_dry_run completed in an earlier launch of this job; not run again" in again.stderr
    # a validation that a requeue interrupted (its record RUNNING) runs again
    status = dry_run_dir / "reports" / "status" / "validate_dry_run.json"
    status.write_text(json.dumps({**json.loads(status.read_text()), "state": "RUNNING"}))
    assert _launch(dry_run_dir, "dry_run", 2).returncode == 0
    assert _launched(dry_run_dir)[4:] == ["preflight", "validate_dry_run"]


def test_a_second_node_that_starts_late_still_trains(dry_run_dir):
    # the first node ran the whole job in this launch before the second node's runtime started (a slow node; the
    # stand-in training does not wait for its peers): the second node must not take the first node's records of
    # this launch for an earlier launch's work, or it skips its part of the training
    assert _launch(dry_run_dir, "dry_run", 0).returncode == 0
    late = _launch(dry_run_dir, "dry_run", 0, SLURM_NODEID="1")
    assert late.returncode == 0, late.stderr
    assert _launched(dry_run_dir) == ["preflight", "dry_run", "validate_dry_run", "dry_run"]
    assert "not run again" not in late.stderr
    assert (dry_run_dir / "fake" / "dry_run.1.env").exists()


def test_a_preflight_failure_stops_the_job_before_training(dry_run_dir):
    result = _launch(dry_run_dir, "dry_run", 0, FAKE_FAIL_STEP="preflight")
    assert result.returncode == 2
    assert _launched(dry_run_dir) == ["preflight"]
    states = {n: json.loads((dry_run_dir / "reports" / "status" / f"{n}.json").read_text()) for n in NAMES}
    assert states["preflight"]["state"] == "FAILED" and states["preflight"]["message"] == "fake failure in preflight"
    assert states["dry_run"]["state"] == states["validate_dry_run"]["state"] == "CANCELLED"
    assert states["dry_run"]["message"] == "preflight failed in this job: fake failure in preflight"


def test_the_full_run_fails_on_its_node_checks_before_training(dry_run_dir):
    result = _launch(dry_run_dir, "train", 0, FAKE_FAIL_STEP="train_preflight")
    assert result.returncode == 2
    assert _launched(dry_run_dir) == ["train_preflight"]
    record = json.loads((dry_run_dir / "reports" / "status" / "train.json").read_text())
    assert record["state"] == "FAILED" and "before training: fake failure in train_preflight" in record["message"]
    assert json.loads((dry_run_dir / "reports" / "status" / "train_preflight.json").read_text())["state"] == "FAILED"


@pytest.mark.parametrize(("nodelist", "elapsed", "when"), [
    ("n1", "00:01:05", "after 00:01:05"),
    ("n1", "00:00:00", "as it started"),  # cancelled within its first second: it ran, on n1
    ("None assigned", "00:00:00", "before it started"),
    ("", "", "before it started"),
])
def test_the_note_on_a_cancelled_step_says_when(tmp_path, nodelist, elapsed, when):
    from sftjobs.status import describe_break

    plan = build_plan(load_profile("toy"), dry_run_first=False)
    states = {name: StepState("CANCELLED", nodelist=nodelist if name == "preflight" else "", elapsed=elapsed)
              for name in ("preflight", "train", "validate")}
    states["preflight"].extra["cancelled_by_uid"] = str(os.getuid())
    note = describe_break(tmp_path, {"run_id": "r"}, states, plan, "preflight")
    assert note.startswith(f"step preflight was cancelled by {getpass.getuser()} {when}"), note
    assert note.endswith("; train, validate did not run.")

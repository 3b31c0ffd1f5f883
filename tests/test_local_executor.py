"""The local executor: the same chain in dependency order on this machine, in a detached runner that outlives
the submitting process, tracked by PID; a failed step cancels the rest; cancel stops a running chain."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil

from sftjobs.cli import main
from sftjobs.runs import read_manifest
from tests.conftest import run_cli
from tests.slurm_helpers import FAKE_PYTHON, wait_until

FAKE = ["--set", f"launcher.python={FAKE_PYTHON}", "--executor", "local"]


def submit(in_tmp, *extra, env=None):
    result = run_cli("submit", "toy", *FAKE, *extra, cwd=in_tmp, env=env)
    assert result.returncode == 0, result.stderr
    assert "executor: local (asked for local)" in result.stdout
    run_id = next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("run "))
    return Path(os.environ["SFTJOBS_JOBS_DIR"]) / run_id


def step_states(capsys, run_dir):
    assert main(["status", run_dir.name, "--json"]) == 0
    return {row["step"]: row for row in json.loads(capsys.readouterr().out)["steps"]}


def finished(capsys, run_dir):
    rows = step_states(capsys, run_dir)
    return rows if all(r["state"] in ("COMPLETED", "FAILED", "CANCELLED") for r in rows.values()) else None


def test_local_chain_runs_in_order_after_the_submitter_exits(in_tmp, capsys):
    run_dir = submit(in_tmp, env={"FAKE_SLEEP": "1"})
    # the submitting process has exited; the runner is a session leader of its own
    runner = read_manifest(run_dir)["jobs"]["data"].split(".")[0]
    assert psutil.Process(int(runner)).pid == os.getsid(int(runner))
    rows = wait_until(lambda: finished(capsys, run_dir), 60, 0.5, "the local chain")
    assert {r["state"] for r in rows.values()} == {"COMPLETED"}
    jobs = read_manifest(run_dir)["jobs"]
    assert jobs["preflight"] == jobs["train"] and len(set(jobs.values())) == 4  # preflight runs in the training job
    assert [rows[s]["job_id"] for s in rows] == [jobs[s] for s in rows]
    # each step's own record (the runtime's): in order, each after its parents, the job's two one after the other
    records = {s: json.loads((run_dir / "reports" / "status" / f"{s}.json").read_text()) for s in rows}
    order = sorted(records, key=lambda s: records[s]["started"])
    assert order == ["data", "model", "preflight", "train", "validate"]
    for step in order[1:]:
        parents = {"model": [], "preflight": ["data", "model"], "train": ["preflight"], "validate": ["train"]}[step]
        for parent in parents:
            assert records[parent]["ended"] <= records[step]["started"]
    log = (run_dir / "logs" / "train.log").read_text()  # the training job's log: its preflight, then its training
    assert log.index("fake step preflight done") < log.index("fake step train done")
    assert (run_dir / "logs" / "validate.log").read_text().startswith("fake step validate done")
    assert main(["status"]) == 0
    assert capsys.readouterr().out.startswith("no live run among the 1 run in ")  # finished: --all shows it
    assert main(["status", "--all"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].startswith(f"run {run_dir.name}  profile toy  local  started ")
    assert table[2].split()[:4] == ["STEP", "JOBID", "STATE", "TIME"] and "COMPLETED" in table[3]


def test_local_failure_cancels_dependants(in_tmp, capsys):
    run_dir = submit(in_tmp, env={"FAKE_FAIL_STEP": "preflight"})
    rows = wait_until(lambda: finished(capsys, run_dir), 60, 0.5, "the local chain")
    assert rows["preflight"]["state"] == "FAILED"
    # train shares preflight's job: it never started there; validate's job was never started
    assert rows["train"]["state"] == "CANCELLED" and "preflight failed in this job" in rows["train"]["reason"]
    assert not (run_dir / "fake" / "train.0.env").exists()
    assert rows["validate"]["state"] == "CANCELLED" and "DependencyNeverSatisfied" in rows["validate"]["reason"]
    assert main(["logs", run_dir.name]) == 0  # defaults to the failed step
    assert "fake failure in preflight" in capsys.readouterr().out


def test_local_cancel_stops_the_running_step(in_tmp, capsys):
    run_dir = submit(in_tmp, env={"FAKE_SLEEP": "30"})
    wait_until(lambda: step_states(capsys, run_dir)["data"]["state"] == "RUNNING", 20, 0.3, "data running")
    wait_until(lambda: json.loads((run_dir / "local" / "chain.json").read_text())["steps"]["data"]["pid"], 10, 0.2,
               "the step pid")
    pid = json.loads((run_dir / "local" / "chain.json").read_text())["steps"]["data"]["pid"]
    assert main(["cancel", run_dir.name]) == 0
    assert "cancelled data" in capsys.readouterr().out
    rows = wait_until(lambda: finished(capsys, run_dir), 20, 0.3, "cancelled chain")
    assert {r["state"] for r in rows.values()} == {"CANCELLED"}
    time.sleep(0.5)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_logs_follow_streams_until_the_step_ends(in_tmp, capsys):
    run_dir = submit(in_tmp, env={"FAKE_SLEEP": "2"})
    wait_until(lambda: step_states(capsys, run_dir)["data"]["state"] != "PENDING", 20, 0.2, "data started")
    result = run_cli("logs", run_dir.name, "data", "-f", cwd=in_tmp, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "fake step data done" in result.stdout  # followed to the end, then returned by itself
    wait_until(lambda: finished(capsys, run_dir), 60, 0.5, "the local chain")

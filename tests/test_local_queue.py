"""Local runs share the machine: trainings queue for a slot (resources.local_trainings, default 1) instead of each
taking every CPU thread at once, and two data steps writing one data folder at the same moment leave whole files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import run_cli
from tests.slurm_helpers import FAKE_PYTHON, wait_until


def submit_toy(in_tmp: Path, name: str, *sets: str) -> Path:
    args = ["submit", "toy", "--executor", "local", "--set", f"launcher.python={FAKE_PYTHON}",
            "--set", f"output_dir={in_tmp / name}"]
    for item in sets:
        args += ["--set", item]
    result = run_cli(*args, cwd=in_tmp, env={"FAKE_SLEEP": "3"})
    assert result.returncode == 0, result.stderr
    run_id = next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("run "))
    return Path(os.environ["SFTJOBS_JOBS_DIR"]) / run_id


def train_entry(run_dir: Path) -> dict:
    return json.loads((run_dir / "local" / "chain.json").read_text())["steps"]["train"]


def watch_trainings(runs: list[Path], timeout: float) -> tuple[list[list[str]], set[str]]:
    """Sample both runs' train states until both ended: the states seen together, and the waiting reasons."""
    seen, reasons = [], set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = [train_entry(r) for r in runs]
        seen.append([e["state"] for e in entries])
        reasons |= {e.get("reason") or "" for e in entries if e["state"] == "PENDING"}
        if all(e["state"] in ("COMPLETED", "FAILED", "CANCELLED") for e in entries):
            return seen, reasons
        time.sleep(0.1)
    raise AssertionError(f"trainings did not end: {seen[-1]}")


def test_two_local_trainings_take_turns(in_tmp):
    runs = [submit_toy(in_tmp, "ck_a"), submit_toy(in_tmp, "ck_b")]
    seen, reasons = watch_trainings(runs, 120)
    assert ["RUNNING", "RUNNING"] not in seen, "two trainings ran at once"
    assert any(r.startswith("LocalTrainingSlot") for r in reasons), reasons
    assert [train_entry(r)["state"] for r in runs] == ["COMPLETED", "COMPLETED"]


def test_local_trainings_two_slots_run_together(in_tmp):
    runs = [submit_toy(in_tmp, "ck_c", "resources.local_trainings=2"),
            submit_toy(in_tmp, "ck_d", "resources.local_trainings=2")]
    seen, _ = watch_trainings(runs, 120)
    assert ["RUNNING", "RUNNING"] in seen


def test_two_data_steps_into_one_data_folder_at_once(in_tmp):
    shared = in_tmp / "shared-data"
    runs = []
    for name in ("r1", "r2"):
        assert run_cli("render", "demo", "--out", str(in_tmp / name), "--set", f"data.dir={shared}",
                       cwd=in_tmp).returncode == 0
        runs.append(in_tmp / name)
    procs = [subprocess.Popen([sys.executable, "-m", "sftjobs.steps", "data", "--run-dir", str(r)], cwd=in_tmp,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in runs]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    for path in shared.glob("*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        assert rows and all("conversations" in row for row in rows), path
    wait_until(lambda: not list(shared.glob(".*.tmp")), 5, 0.2, "no temp files left")


def test_a_job_shows_running_only_once_it_starts(in_tmp):
    """The runner leaves a job PENDING until the job says it started (a training: once it holds its slot), so a
    training waiting for the slot never shows RUNNING beside the one that holds it."""
    from sftjobs.executors import local
    from sftjobs.planning.dag import build_plan
    from sftjobs.profile import load_profile

    plan = build_plan(load_profile("toy"))
    run_dir = in_tmp / "run"
    (run_dir / "local").mkdir(parents=True)
    state = local.ChainState(run_dir)
    state.write(local.initial_state(plan, os.getpid()))
    seen: list[tuple[str, str, str]] = []

    def invoke(step, rd, started, waiting):
        seen.append((step.name, "entry", state.read()["steps"][step.name]["state"]))
        if step.kind == "train":
            waiting("LocalTrainingSlot: test")
            seen.append((step.name, "waiting", state.read()["steps"][step.name]["state"]))
        started()
        seen.append((step.name, "started", state.read()["steps"][step.name]["state"]))
        return 0

    assert local.ChainRunner(plan, run_dir, invoke).run()
    assert {s.name for s in plan.steps if s.kind == "train"} & {name for name, _, _ in seen}, seen
    for name, moment, job_state in seen:
        assert job_state == ("RUNNING" if moment == "started" else "PENDING"), (name, moment, seen)
    assert all(e["state"] == "COMPLETED" for e in state.read()["steps"].values())

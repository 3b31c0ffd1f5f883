"""The command line as a Slurm user expects it (issue 19, items 5 and 6), through the real CLI and the local
executor: one per-user run store whatever folder sftjobs runs from; status filters, --watch, 80 columns, one TIME
format, notes that read as sentences; list and clean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.slurm_helpers import FAKE_PYTHON, wait_until

FAKE = ["--set", f"launcher.python={FAKE_PYTHON}", "--executor", "local"]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """No $SFTJOBS_JOBS_DIR: the default store, $XDG_DATA_HOME/sftjobs, under tmp."""
    monkeypatch.delenv("SFTJOBS_JOBS_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("COLUMNS", "80")
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    return tmp_path / "xdg" / "sftjobs"


def submit(cwd: Path, *extra: str, env=None) -> str:
    result = run_cli("submit", "toy", *FAKE, *extra, cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr
    return next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("run "))


def steps(run_id: str, cwd: Path) -> dict[str, dict]:
    result = run_cli("status", run_id, "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return {row["step"]: row for row in json.loads(result.stdout)["steps"]}


def done(run_id: str, cwd: Path):
    rows = steps(run_id, cwd)
    return rows if all(r["state"] in ("COMPLETED", "FAILED", "CANCELLED") for r in rows.values()) else None


def test_one_store_whatever_folder_sftjobs_runs_from(store, tmp_path):
    first = submit(tmp_path / "a", env={"FAKE_SLEEP": "3"})
    # the same output_dir, seen from another folder: refused while the first run writes there
    refused = run_cli("submit", "toy", *FAKE, cwd=tmp_path / "b")
    assert refused.returncode == 2 and f"run {first} is still running into {store / 'checkpoints'}" in refused.stderr
    wait_until(lambda: done(first, tmp_path / "c"), 60, 0.5, "the chain")
    second = submit(tmp_path / "b")
    wait_until(lambda: done(second, tmp_path / "c"), 60, 0.5, "the chain")
    # status from a third folder sees both, and says where the runs are
    out = run_cli("status", "--all", cwd=tmp_path / "c").stdout
    assert out.splitlines()[0] == f"2 of the 2 runs in {store / 'jobs'}"
    assert f"run {first}  profile toy" in out and f"run {second}  profile toy" in out
    # nothing is written where the command ran; relative profile paths resolve against the store
    assert [list((tmp_path / d).iterdir()) for d in "abc"] == [[], [], []]
    paths = [json.loads((store / "jobs" / r / "plan.json").read_text())["paths"] for r in (first, second)]
    assert paths[0]["model_dir"] == paths[1]["model_dir"] == str(store / "models" / "Qwen2.5-0.5B-Instruct")
    assert paths[0]["data_dir"] == paths[1]["data_dir"] == str(store / "data")
    assert paths[0]["output_dir"] == str(store / "checkpoints" / "qwen0.5b_toy")


def test_a_data_set_made_for_one_run_is_found_by_the_next(store, tmp_path):
    """The demo's data step (the real one, as a job runs it) for a run rendered in a/, then one rendered in b/."""
    logs = []
    for cwd in (tmp_path / "a", tmp_path / "b"):
        out = run_cli("render", "demo", cwd=cwd).stdout
        run_dir = Path(out.split(" into ")[1].split(" (")[0])
        step = subprocess.run([sys.executable, "-m", "sftjobs.steps", "data", "--run-dir", str(run_dir)], cwd=cwd,
                              capture_output=True, text=True, timeout=120)
        assert step.returncode == 0, step.stderr
        logs.append(step.stdout + step.stderr)
    assert "made 240 synthetic" in logs[0] and "made 240 synthetic" not in logs[1]
    assert (store / "data" / "demo" / "source" / "synthetic_240.jsonl").is_file()


def test_jobs_dir_flag_and_its_mistakes(store, tmp_path):
    elsewhere = tmp_path / "shared fs" / "runs"
    run = submit(tmp_path / "a", "--jobs-dir", str(elsewhere))
    assert (elsewhere / run / "manifest.json").is_file() and not (store / "jobs").exists()
    paths = json.loads((elsewhere / run / "plan.json").read_text())["paths"]
    assert paths["data_dir"] == str(tmp_path / "shared fs" / "data")  # the store is the runs folder's parent
    wait_until(lambda: run_cli("status", run, "--jobs-dir", str(elsewhere), cwd=tmp_path / "c").returncode == 0, 10)
    listed = run_cli("--jobs-dir", str(elsewhere), "list", cwd=tmp_path / "c")
    assert listed.returncode == 0 and run in listed.stdout and f"runs in {elsewhere}" in listed.stdout
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    bad = run_cli("status", "--jobs-dir", str(a_file), cwd=tmp_path / "c")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert f"--jobs-dir {a_file}: {a_file} exists and is not a directory" in bad.stderr


def test_status_filters_sentences_and_80_columns(store, tmp_path):
    c = tmp_path / "c"
    failed = submit(tmp_path / "a", env={"FAKE_FAIL_STEP": "preflight"})
    wait_until(lambda: done(failed, c), 60, 0.5, "the failing chain")
    live = submit(tmp_path / "b", env={"FAKE_SLEEP": "30"})
    wait_until(lambda: steps(live, c)["data"]["state"] == "RUNNING", 30, 0.3, "data running")
    try:
        # live runs by default, the finished one with --all
        out = run_cli("status", cwd=c).stdout
        assert out.splitlines()[0] == f"1 of the 2 runs in {store / 'jobs'} (--all shows the 1 finished)"
        assert live in out and failed not in out
        out = run_cli("status", "--all", cwd=c).stdout
        assert live in out and failed in out
        # every row fits 80 columns (the first line is the store's path; notes are sentences a terminal wraps)
        assert all(len(line) <= 80 for line in out.splitlines()[1:] if not line.startswith("note:")), out
        # the note names its run and reads as a sentence, with what to do next
        note = next(line for line in out.splitlines() if line.startswith("note:"))
        assert note == (f"note: run {failed}: step preflight failed with exit code 2 (fake failure in preflight); "
                        f"train, validate did not run. `sftjobs logs {failed} preflight` shows its log.")
        # --state with squeue's codes or Slurm's names; --profile; last
        out = run_cli("status", "--state", "F", cwd=c).stdout
        rows = [line.split()[0] for line in out.splitlines()[3:] if not line.startswith("note:")]
        assert rows == ["preflight"] and failed in out and live not in out
        assert live in run_cli("status", "-t", "running,PD", cwd=c).stdout
        assert run_cli("status", "--profile", "prod", cwd=c).stdout.startswith("no live run of profile prod among the 2 runs")
        assert run_cli("status", "-t", "TO", cwd=c).stdout.startswith("no run has a step in TO among the 2 runs")
        assert live in run_cli("status", "--profile", "toy", cwd=c).stdout
        assert f"run {live} " in run_cli("status", "last", cwd=c).stdout
        bad = run_cli("status", "--state", "DONE", cwd=c)
        assert bad.returncode == 2 and "--state 'DONE' is not a job state" in bad.stderr and "CD" in bad.stderr
        # list: one line a run
        listed = run_cli("list", cwd=c).stdout.splitlines()
        assert listed[1].split() == ["RUN", "PROFILE", "STATE", "STARTED", "PROGRESS"]
        assert listed[2].split()[:3] == [failed, "toy", "FAILED"] and listed[2].endswith("2/5 steps")
        assert listed[3].split()[:3] == [live, "toy", "RUNNING"]
    finally:
        run_cli("cancel", live, cwd=c)
    wait_until(lambda: done(live, c), 30, 0.5, "the cancelled chain")
    out = run_cli("status", live, cwd=c).stdout
    assert "CANCELLED" in out and "by 0" not in out


def test_watch_redraws_a_bounded_number_of_frames(store, tmp_path):
    run = submit(tmp_path / "a", env={"FAKE_SLEEP": "1"})
    start = time.time()
    result = run_cli("status", "--all", "--watch", "0.5", "--count", "3", cwd=tmp_path / "c")
    assert result.returncode == 0 and time.time() - start >= 1.0
    frames = result.stdout.split("every 0.5s: sftjobs status")
    assert len(frames) == 4 and all(run in frame for frame in frames[1:])
    for args in (["--watch", "0"], ["--watch", "1", "--count", "0"], ["--count", "2"], ["--watch", "--json"]):
        bad = run_cli("status", *args, cwd=tmp_path / "c")
        assert bad.returncode == 2 and bad.stderr.startswith("sftjobs: error: --")


def test_watch_redraws_in_place_on_a_terminal(store, tmp_path):
    """On a terminal each frame starts with cursor-home + clear, so the table is redrawn where it was."""
    import pty

    submit(tmp_path / "a")
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(tmp_path / "c")
        os.execv(sys.executable, [sys.executable, "-m", "sftjobs", "status", "--watch", "0.2", "--count", "2"])
    chunks = []
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.waitpid(pid, 0)
    assert b"".join(chunks).count(b"\x1b[H\x1b[J") == 2


def test_clean_keeps_live_runs_and_checkpoints_unless_asked(store, tmp_path):
    c = tmp_path / "c"
    old = submit(tmp_path / "a", "--set", "output_dir=./checkpoints/{run_id}")
    wait_until(lambda: done(old, c), 60, 0.5, "the chain")
    checkpoints = store / "checkpoints" / old
    checkpoints.mkdir(parents=True)
    (checkpoints / "trainer_log.jsonl").write_text("{}\n")
    live = submit(tmp_path / "b", "--set", "output_dir=./checkpoints/{run_id}", env={"FAKE_SLEEP": "30"})
    wait_until(lambda: steps(live, c)["data"]["state"] == "RUNNING", 30, 0.3, "data running")
    try:
        refused = run_cli("clean", live, cwd=c)
        assert refused.returncode == 2 and f"run {live} is still live" in refused.stderr
        dry = run_cli("clean", "--older-than", "0", "--dry-run", cwd=c)
        assert f"would remove {old}" in dry.stdout and live not in dry.stdout
        assert (store / "jobs" / old).is_dir()
        cleaned = run_cli("clean", "--older-than", "0", cwd=c)
        assert f"removed {old}" in cleaned.stdout and "checkpoints kept" in cleaned.stdout
        assert not (store / "jobs" / old).exists() and checkpoints.is_dir() and (store / "jobs" / live).is_dir()
    finally:
        run_cli("cancel", live, cwd=c)
    wait_until(lambda: done(live, c), 30, 0.5, "the cancelled chain")
    cleaned = run_cli("clean", live, "--checkpoints", cwd=c)
    assert cleaned.returncode == 0 and f"removed {live}" in cleaned.stdout
    assert not (store / "jobs" / live).exists()
    assert checkpoints.is_dir()  # another run's checkpoints are never touched


def test_clean_mistakes_are_one_message(store, tmp_path):
    for args, text in ((["--older-than", "-1"], "--older-than -1: give a number of days >= 0"),
                       (["nosuchrun"], "no run 'nosuchrun' in ")):
        bad = run_cli("clean", *args, cwd=tmp_path / "c")
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and text in bad.stderr, bad.stderr
    assert run_cli("clean", cwd=tmp_path / "c").stdout.startswith("nothing to clean in ")

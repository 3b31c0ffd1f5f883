"""One training per output_dir: two submits started at the same moment into one output_dir are not both accepted
(the check and the queueing are one step under a lock on the run store), and a train step holds an flock on its
output_dir while it writes, so a second writer from another run is refused at once (also across run stores), the
lock is gone when its holder exits or dies, and the same step's requeue waits for its predecessor's lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from sftjobs.errors import SftjobsError
from sftjobs.steps import train
from tests.conftest import run_cli
from tests.slurm_helpers import FAKE_PYTHON

HOLDER = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"run": sys.argv[2], "step": "train", "host": "h", "pid": os.getpid()}).encode())
print("held", flush=True)
time.sleep(float(sys.argv[3]))
"""


def hold(lock: Path, run: str, seconds: float) -> subprocess.Popen:
    """Another process (another run's train step) holding the output_dir's lock."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), run, str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def ctx_for(tmp_path: Path, run: str):
    logged: list[str] = []
    return SimpleNamespace(node_rank=0, run_dir=tmp_path / run, step=SimpleNamespace(name="train"),
                           log=logged.append), logged


def test_a_second_writer_from_another_run_is_refused_at_once(tmp_path):
    out = tmp_path / "ckpt"
    holder = hold(out / train.LOCK_NAME, "other-run", 30)
    try:
        ctx, _ = ctx_for(tmp_path, "this-run")
        started = time.monotonic()
        with pytest.raises(SftjobsError, match=r"being written by run other-run \(step train, host h"):
            with train.output_dir_lock(ctx, out):
                pass
        assert time.monotonic() - started < 3
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (killed, as a crash would): the lock went with it
    with train.output_dir_lock(ctx, out):
        assert json.loads((out / train.LOCK_NAME).read_text())["run"] == "this-run"


def test_the_same_steps_requeue_waits_for_its_predecessors_lock(tmp_path):
    out = tmp_path / "ckpt"
    holder = hold(out / train.LOCK_NAME, "this-run", 6)  # the previous attempt, still exiting
    try:
        ctx, logged = ctx_for(tmp_path, "this-run")
        started = time.monotonic()
        with train.output_dir_lock(ctx, out):
            waited = time.monotonic() - started
        assert waited >= 4, waited
        assert any("still locked by this step's previous attempt" in line for line in logged)
    finally:
        holder.kill()
        holder.wait()


def test_two_submits_at_the_same_moment_into_one_output_dir(in_tmp):
    args = ["submit", "toy", "--set", f"launcher.python={FAKE_PYTHON}", "--executor", "local",
            "--set", f"output_dir={in_tmp / 'shared-ckpt'}"]
    env = {**os.environ, "FAKE_SLEEP": "20"}
    procs = [subprocess.Popen([sys.executable, "-m", "sftjobs", *args], cwd=in_tmp, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    assert "is still running into" in refused and "shared-ckpt" in refused
    accepted = next(out for code, out, _ in results if code == 0)
    run_id = next(line.split()[1] for line in accepted.splitlines() if line.startswith("run "))
    assert run_cli("cancel", run_id, cwd=in_tmp).returncode == 0
    runs = [p for p in Path(os.environ["SFTJOBS_JOBS_DIR"]).iterdir() if (p / "manifest.json").exists()]
    assert [p.name for p in runs] == [run_id]  # the refused submit left no run behind


def test_the_train_step_refuses_an_output_dir_another_run_writes(in_tmp):
    """Through the real step runtime: the lock is taken before training starts; the step fails with the message."""
    assert run_cli("render", "demo", "--out", str(in_tmp / "run"), cwd=in_tmp).returncode == 0
    plan = json.loads((in_tmp / "run" / "plan.json").read_text())
    out = Path(plan["paths"]["output_dir"])
    holder = hold(out / train.LOCK_NAME, "other-run", 60)
    try:
        done = subprocess.run([sys.executable, "-m", "sftjobs.steps", "train", "--only", "--run-dir", str(in_tmp / "run")],
                              cwd=in_tmp, capture_output=True, text=True, timeout=120)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert done.returncode == 2, done.stderr[-2000:]
    assert "is being written by run other-run" in done.stderr
    status = json.loads((in_tmp / "run" / "reports" / "status" / "train.json").read_text())
    assert status["state"] == "FAILED"

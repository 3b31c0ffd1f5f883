"""`sftjobs cancel` stops a training promptly: the step gets SIGTERM (passed on by the job's task on Slurm, sent to
the step's process group locally), saves the optimizer step it is on and exits; cancel returns once every job has
ended and says where training stopped, and `resume` right after it continues from that step (the real demo chain,
LLaMA-Factory on the CPU; locally and on the Slurm test cluster)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.slurm_helpers import wait_until

pytestmark = pytest.mark.train
# 3000 steps: cancel lands mid-training even at ~100 steps/s
SETS = ["train.max_steps=3000", "train.save_steps=100000", "train.logging_steps=1"]


def logged_steps(output_dir: Path) -> list[int]:
    path = output_dir / "trainer_log.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["current_steps"] for r in records if "loss" in r]


def cancel_then_resume(in_tmp: Path, executor: str) -> None:
    args = ["submit", "demo", "--executor", executor]
    for item in SETS + (["resources.mem=3G", "resources.cpu_step_mem=2G"] if executor == "slurm" else []):
        args += ["--set", item]
    submitted = run_cli(*args, cwd=in_tmp, timeout=300)
    assert submitted.returncode == 0, submitted.stderr
    run_id = next(line.split()[1] for line in submitted.stdout.splitlines() if line.startswith("run "))
    run_dir = Path(os.environ["SFTJOBS_JOBS_DIR"]) / run_id
    output_dir = Path(json.loads((run_dir / "plan.json").read_text())["paths"]["output_dir"])
    wait_until(lambda: len(logged_steps(output_dir)) >= 10, 900, 0.5, "10 trained steps")

    started = time.monotonic()
    cancelled = run_cli("cancel", run_id, cwd=in_tmp, timeout=300)
    took = time.monotonic() - started
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    assert "every cancelled job has ended" in cancelled.stdout
    assert "train: stopped on SIG" in cancelled.stdout and "after saving checkpoint-" in cancelled.stdout
    assert took < 120, took
    stopped_at = max(logged_steps(output_dir))
    time.sleep(3)
    assert max(logged_steps(output_dir)) == stopped_at  # nothing trains after cancel returned
    marker = json.loads((run_dir / "reports" / "stops" / "train.json").read_text())
    assert marker["step"] == stopped_at and (output_dir / f"checkpoint-{stopped_at}" / "trainer_state.json").is_file()

    resumed = run_cli("resume", run_id, "--wait", cwd=in_tmp, timeout=1500)  # right after cancel: accepted
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == state["max_steps"]
    steps = logged_steps(output_dir)
    assert set(steps) == set(range(1, state["max_steps"] + 1))
    assert sum(c - 1 for c in Counter(steps).values()) == 0, Counter(steps).most_common(3)


def test_cancel_saves_and_resume_continues_locally(in_tmp):
    cancel_then_resume(in_tmp, "local")


@pytest.mark.slurm
def test_cancel_saves_and_resume_continues_on_slurm(slurm, in_tmp):
    cancel_then_resume(in_tmp, "slurm")

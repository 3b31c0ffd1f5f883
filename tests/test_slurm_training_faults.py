"""Real training on the real Slurm test cluster (CPU jobs): a requeued training job resumes from its newest
complete checkpoint and ends with the same total steps; the dry run's measured speed sets the full run's
time limit when the profile gives none; a time limit's USR2 requeues and resumes a checkpointable step."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from sftjobs.cli import main
from tests.slurm_helpers import scontrol_job, wait_until
from tests.test_slurm_chain import all_done

pytestmark = [pytest.mark.slurm, pytest.mark.train]
CPU_JOBS = ["resources.mem=3G", "resources.cpu_step_mem=2G", "train.num_train_epochs=4.0"]


def submit_demo(capsys, *extra, sets=()):
    args = ["submit", "demo", "--executor", "slurm", *extra]
    for item in [*CPU_JOBS, *sets]:
        args += ["--set", item]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    run_id = next(line.split()[1] for line in out.splitlines() if line.startswith("run "))
    run_dir = Path(os.environ["SFTJOBS_JOBS_DIR"]) / run_id
    return run_dir, json.loads((run_dir / "manifest.json").read_text())


def minutes(limit: str) -> int:
    days, _, rest = limit.rpartition("-")
    h, m, s = (int(x) for x in rest.split(":"))
    return int(days or 0) * 1440 + h * 60 + m + (1 if s else 0)


def checkpoint_done(output_dir: Path, step: int) -> bool:
    return (output_dir / f"checkpoint-{step}" / "trainer_state.json").is_file()


def test_requeued_training_resumes_and_the_dry_run_sets_the_time_limit(slurm, in_tmp, capsys):
    run_dir, manifest = submit_demo(capsys, "--dry-run-first", sets=["resources.time=null"])
    jobs = manifest["jobs"]
    output_dir = Path(json.loads((run_dir / "plan.json").read_text())["paths"]["output_dir"])
    # the dry run's validation lowers the queued full run's limit to its estimate
    report_path = run_dir / "reports" / "time_limit.json"
    wait_until(report_path.exists, 600, 1, "the dry run's time-limit estimate")
    estimate = json.loads(report_path.read_text())
    assert estimate["applied_to"] == jobs["train"]
    assert minutes(scontrol_job(jobs["train"])["TimeLimit"]) == estimate["time_limit_minutes"]
    # requeue the full run once its first checkpoint is complete
    wait_until(lambda: checkpoint_done(output_dir, 25), 600, 0.3, "checkpoint-25")
    subprocess.run(["scontrol", "requeue", jobs["train"]], check=True)
    final = wait_until(lambda: all_done(capsys, manifest["run_id"]), 900, 3, "the chain")
    assert set(final.values()) == {"COMPLETED"}, final
    assert int(scontrol_job(jobs["train"]).get("Restarts", "0")) >= 1
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == state["max_steps"] == 200
    log = (run_dir / "slurm" / "train" / f"{jobs['train']}_0_log.out").read_text()
    assert "resuming from" in log and "checkpoint-" in log
    assert json.loads((run_dir / "handoff.json").read_text())["final_checkpoint"]


def test_time_limit_signal_requeues_and_resumes(slurm, in_tmp, capsys):
    # a 4-minute limit with USR2 180 s before it: the step gets the signal 60-90 s in (Slurm checks limits every
    # 30 s), after >= 45 s of training, and submitit requeues it as Checkpointable; each restart resumes from
    # the newest checkpoint, so the 3000 steps finish within a few attempts
    run_dir, manifest = submit_demo(capsys, sets=["resources.time=4", "resources.signal_delay_s=180",
                                                  "train.num_train_epochs=60.0", "train.save_steps=100",
                                                  "train.logging_steps=50"])
    final = wait_until(lambda: all_done(capsys, manifest["run_id"]), 1500, 3, "the chain")
    assert set(final.values()) == {"COMPLETED"}, final
    train = manifest["jobs"]["train"]
    assert int(scontrol_job(train).get("Restarts", "0")) >= 1
    output_dir = Path(json.loads((run_dir / "plan.json").read_text())["paths"]["output_dir"])
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == state["max_steps"] == 3000
    log = (run_dir / "slurm" / "train" / f"{train}_0_log.out").read_text()
    assert "timed-out" in log and "resuming from" in log

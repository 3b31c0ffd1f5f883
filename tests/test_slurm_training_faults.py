"""Real training on the real Slurm test cluster (CPU jobs): a requeued training job resumes from its newest
complete checkpoint and ends with the same total steps; the dry run's measured speed sets the full run's
time limit when the profile gives none; a time limit's USR2, `scontrol requeue`, `scancel --signal=USR2` and a
preemption by a higher-tier partition's job each make training save the step it is on, so with periodic saves larger than the whole run no requeue repeats more
than one optimizer step (the number repeated is counted from trainer_log.jsonl and printed)."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from sftjobs.cli import main
from sftjobs.steps.train import checkpoints, is_complete_checkpoint
from tests.slurm_helpers import preempt_node, scontrol_job, wait_until
from tests.test_slurm_chain import all_done

pytestmark = [pytest.mark.slurm, pytest.mark.train]
TIME_LIMIT_STEPS = 4000
REQUEUE_STEPS = 3000
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


def logged_steps(output_dir: Path) -> list[int]:
    """The optimizer steps trainer_log.jsonl logged a loss for (logging_steps 1: every step trained, requeues
    included; a step trained twice appears twice)."""
    path = output_dir / "trainer_log.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["current_steps"] for r in records if "loss" in r]


def trained_twice(steps: list[int]) -> int:
    return sum(count - 1 for count in Counter(steps).values())


def restarts(job_id: str) -> int:
    return int(scontrol_job(job_id).get("Restarts", "0") or 0)


def check_every_step_trained_once(output_dir: Path, requeues: int, what: str) -> None:
    """The run reached its total steps, every optimizer step was trained, and no requeue repeated more than one
    step (the number repeated is printed)."""
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == state["max_steps"]
    steps = logged_steps(output_dir)
    assert set(steps) == set(range(1, state["max_steps"] + 1))
    repeated = trained_twice(steps)
    print(f"{what}: {requeues} requeue(s), {repeated} optimizer step(s) trained twice")
    assert repeated <= requeues, Counter(steps).most_common(3)


def save_reasons(run_dir: Path) -> list[str]:
    """Why each checkpoint of the training was saved (reports/saves-train.jsonl): "signal", "periodic", ..."""
    path = run_dir / "reports" / "saves-train.jsonl"
    return [json.loads(line)["reason"] for line in path.read_text().splitlines()]


def test_requeued_training_resumes_and_the_dry_run_sets_the_time_limit(slurm, in_tmp, capsys):
    # 3000 steps (the demo trains 45-400 steps/s on this CPU): the requeue always lands mid-training, never after
    # the training completed (a relaunch then only skips the completed step, and nothing resumes)
    run_dir, manifest = submit_demo(capsys, "--dry-run-first",
                                    sets=["resources.time=null", f"train.max_steps={REQUEUE_STEPS}",
                                          "train.save_total_limit=2"])
    jobs = manifest["jobs"]
    output_dir = Path(json.loads((run_dir / "plan.json").read_text())["paths"]["output_dir"])
    # the dry run's validation lowers the queued full run's limit to its estimate
    report_path = run_dir / "reports" / "time_limit.json"
    wait_until(report_path.exists, 600, 1, "the dry run's time-limit estimate")
    estimate = json.loads(report_path.read_text())
    assert estimate["applied_to"] == jobs["train"]
    # the dry run's one checkpoint save is measured and checked against the signal's lead time
    window = estimate["signal"]
    assert window["save_seconds"] > 0 and window["signal_delay_s"] == 120
    assert window["needed_s"] >= 75 and window["ok"] == (120 >= window["needed_s"])
    assert minutes(scontrol_job(jobs["train"])["TimeLimit"]) == estimate["time_limit_minutes"]
    # requeue the full run once its first checkpoint is complete (save_total_limit may already have removed it)
    wait_until(lambda: any(is_complete_checkpoint(p) for _, p in checkpoints(output_dir)), 600, 0.3,
               "a complete checkpoint")
    subprocess.run(["scontrol", "requeue", jobs["train"]], check=True)
    final = wait_until(lambda: all_done(capsys, manifest["run_id"]), 900, 3, "the chain")
    assert set(final.values()) == {"COMPLETED"}, final
    assert int(scontrol_job(jobs["train"]).get("Restarts", "0")) >= 1
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == state["max_steps"] == REQUEUE_STEPS
    log = (run_dir / "slurm" / "train" / f"{jobs['train']}_0_log.out").read_text()
    assert "resuming from" in log and "checkpoint-" in log
    assert json.loads((run_dir / "handoff.json").read_text())["final_checkpoint"]


def test_time_limit_signal_saves_the_current_step_and_requeues(slurm, in_tmp, capsys):
    # a 4-minute limit with USR2 180 s before it: the step gets the signal 60-90 s in (Slurm checks limits every
    # 30 s) and saves the step it is on; submitit requeues it as Checkpointable. No periodic save happens (save_steps
    # is larger than the run), so every requeue resumes from the signal's checkpoint.
    # The signal comes ~60 s into each launch, after ~20 s of preflight and loading: ~35 s of training per launch,
    # ~900 steps on this 2-CPU machine (2026-12-06: 545, 870, 956 steps in the first three launches). 4000 steps are
    # more than one launch trains at the fastest this CPU trains the demo (~100 steps/s), so the signal always comes
    # mid-training, and the test needs ~5 launches (~5 min) instead of the ~13 that 12000 steps took
    run_dir, manifest = submit_demo(capsys, sets=["resources.time=4", "resources.signal_delay_s=180",
                                                  f"train.max_steps={TIME_LIMIT_STEPS}", "train.save_steps=100000",
                                                  "train.logging_steps=1", "resources.max_time_requeues=30"])
    final = wait_until(lambda: all_done(capsys, manifest["run_id"]), 1500, 3, "the chain")
    assert set(final.values()) == {"COMPLETED"}, final
    train = manifest["jobs"]["train"]
    requeues = restarts(train)
    assert requeues >= 1
    output_dir = Path(json.loads((run_dir / "plan.json").read_text())["paths"]["output_dir"])
    assert json.loads((output_dir / "trainer_state.json").read_text())["max_steps"] == TIME_LIMIT_STEPS
    check_every_step_trained_once(output_dir, requeues, "time limit")
    # a signal that comes while a restarted job is still loading finds nothing trained since the last save: the
    # requeue then loses nothing without a save (counted above); at least one requeue saved mid-training
    assert save_reasons(run_dir).count("signal") >= 1
    log = (run_dir / "slurm" / "train" / f"{train}_0_log.out").read_text()
    assert "timed-out" in log and "resuming from" in log and "SIGUSR2 received: asked" in log


def test_scontrol_requeue_and_scancel_usr2_save_the_current_step(slurm, in_tmp, capsys):
    """`scontrol requeue` (SIGTERM to every process, then SIGKILL after KillWait) and `scancel --signal=USR2`
    (USR2 to every process of the job's steps: submitit requeues after the save) on one training run."""
    # enough steps that both signals land mid-training however fast this CPU trains the demo (~40-100 steps/s)
    run_dir, manifest = submit_demo(capsys, sets=["train.max_steps=4000", "train.save_steps=100000",
                                                  "train.logging_steps=1"])
    train = manifest["jobs"]["train"]
    output_dir = Path(json.loads((run_dir / "plan.json").read_text())["paths"]["output_dir"])
    wait_until(lambda: len(logged_steps(output_dir)) >= 20, 900, 0.5, "20 trained steps")
    subprocess.run(["scontrol", "requeue", train], check=True)
    wait_until(lambda: restarts(train) >= 1 and scontrol_job(train).get("JobState") == "RUNNING", 600, 1,
               "the requeued job running")
    first = len(logged_steps(output_dir))
    wait_until(lambda: len(logged_steps(output_dir)) >= first + 20, 900, 0.5, "20 more steps after the requeue")
    subprocess.run(["scancel", "--signal=USR2", train], check=True)
    final = wait_until(lambda: all_done(capsys, manifest["run_id"]), 1500, 3, "the chain")
    assert set(final.values()) == {"COMPLETED"}, final
    requeues = restarts(train)
    assert requeues >= 2
    check_every_step_trained_once(output_dir, requeues, "scontrol requeue + scancel --signal=USR2")
    assert save_reasons(run_dir).count("signal") >= 2, save_reasons(run_dir)
    log = (run_dir / "slurm" / "train" / f"{train}_0_log.out").read_text()
    assert "SIGTERM received: asked" in log and "SIGUSR2 received: asked" in log


def test_preemption_saves_the_current_step_and_the_job_comes_back(urgent_partition, in_tmp, capsys):
    """Another user's job in a higher-tier partition takes the training's node: Slurm sends SIGTERM, gives the partition's GraceTime (30 s), and requeues the job
    (PreemptMode=REQUEUE). Training saves the step it is on and the requeued job resumes from it."""
    run_dir, manifest = submit_demo(capsys, sets=["train.max_steps=4000", "train.save_steps=100000",
                                                  "train.logging_steps=1"])
    train = manifest["jobs"]["train"]
    output_dir = Path(json.loads((run_dir / "plan.json").read_text())["paths"]["output_dir"])
    wait_until(lambda: len(logged_steps(output_dir)) >= 20, 900, 0.5, "20 trained steps")
    other = preempt_node(urgent_partition, scontrol_job(train)["NodeList"])
    wait_until(lambda: restarts(train) >= 1, 300, 0.5, "the training job preempted and requeued")
    final = wait_until(lambda: all_done(capsys, manifest["run_id"]), 1500, 3, "the chain")
    assert set(final.values()) == {"COMPLETED"}, final
    # the job requeued itself after the save (a job that ends within the GraceTime is not requeued by Slurm: it
    # would end FAILED and cancel validate), so the preemptor had the node before the GraceTime was up
    attempts = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-j", train, "-o", "State"],
                              check=True, capture_output=True, text=True).stdout.split()
    assert "REQUEUED" in attempts and attempts[-1] == "COMPLETED", attempts
    state_, submitted, started = subprocess.run(["sacct", "-n", "-X", "-P", "-j", other, "-o", "State,Submit,Start"],
                                                check=True, capture_output=True, text=True).stdout.strip().split("|")
    assert state_ == "COMPLETED"
    waited = (datetime.fromisoformat(started) - datetime.fromisoformat(submitted)).total_seconds()
    print(f"preemption: the preemptor's job started {waited:.0f} s after its submission (GraceTime 30 s)")
    assert waited < 30
    check_every_step_trained_once(output_dir, restarts(train), "preemption")
    assert "signal" in save_reasons(run_dir), save_reasons(run_dir)
    log = (run_dir / "slurm" / "train" / f"{train}_0_log.out").read_text()
    assert "SIGTERM received: asked" in log and "resuming from" in log
    assert f"sftjobs: job {train} was preempted (PreemptTime" in log and "PreemptMode REQUEUE); requeueing it" in log

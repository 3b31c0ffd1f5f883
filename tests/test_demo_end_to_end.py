"""The demo chain end to end through real LLaMA-Factory on this CPU: locally (the README's first command)
and as CPU jobs on the real Slurm test cluster."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.train

HANDOFF_KEYS = {"final_checkpoint", "profile", "config_hash", "versions", "deviations"}


def check_finished_run(run_dir: Path) -> None:
    validate = json.loads((run_dir / "reports" / "validate.json").read_text())
    assert validate["ok"] is True, validate["failures"]
    loss = validate["checks"]["loss"]
    assert loss["last_window_mean"] < loss["first_window_mean"], loss
    assert validate["checks"]["checkpoints"]["loaded"]  # the checkpoint loaded with transformers
    assert validate["generation"], "greedy generation on sample prompts"
    handoff = json.loads((run_dir / "handoff.json").read_text())
    assert HANDOFF_KEYS <= set(handoff), handoff.keys()
    final = Path(handoff["final_checkpoint"])
    assert (final / "config.json").exists() and any(final.glob("*.safetensors"))
    assert handoff["profile"] == "demo"
    assert (run_dir / "reports" / "validate_loss.png").stat().st_size > 1000
    data = json.loads((run_dir / "reports" / "data.json").read_text())
    assert data["shape"] == "sharegpt" and data["bad"] == 0


def test_demo_chain_local(in_tmp):
    """The README's first command, with TensorBoard tracking on (the chain is the same with tracking: none)."""
    tensorboard = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    result = run_cli("submit", "demo", "--wait", "--poll", "2", "--set", "tracking=tensorboard", cwd=in_tmp,
                     timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "STEP" in out and "COMPLETED" in out and "loss plot: " in out
    run_dir = next(Path(os.environ["SFTJOBS_JOBS_DIR"]).iterdir())
    check_finished_run(run_dir)
    # the training log was tee'd into the run directory
    assert "train_loss" in (run_dir / "logs" / "train" / "training.log").read_text()
    # TensorBoard: the train step's events in the run directory, every logged step of trainer_log.jsonl, and
    # `sftjobs status RUN` says where they are
    logdir = run_dir / "tensorboard" / "train"
    accumulator = tensorboard.EventAccumulator(str(logdir))
    accumulator.Reload()
    output_dir = Path(json.loads((run_dir / "plan.json").read_text())["paths"]["output_dir"])
    logged = [r["current_steps"] for r in map(json.loads, (output_dir / "trainer_log.jsonl").read_text().splitlines())
              if "loss" in r]
    assert [e.step for e in accumulator.Scalars("train/loss")] == logged and logged
    status = run_cli("status", run_dir.name, cwd=in_tmp)
    assert status.returncode == 0 and f"TensorBoard logs in {run_dir / 'tensorboard'}" in status.stdout, status.stdout


@pytest.mark.slurm
def test_demo_chain_on_slurm_as_cpu_jobs(slurm, in_tmp):
    """With W&B tracking, offline as the submitting shell's WANDB_MODE says: the job gets it from Slurm's
    environment export and logs into the run directory under the run id fixed at render."""
    pytest.importorskip("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": ""}
    result = run_cli("submit", "demo", "--executor", "slurm", "--wait", "--poll", "3", "--set", "tracking=wandb",
                     "--set", "resources.mem=3G", "--set", "resources.cpu_step_mem=2G", cwd=in_tmp, env=env,
                     timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = next(Path(os.environ["SFTJOBS_JOBS_DIR"]).iterdir())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["executor"] == "slurm" and all(j.isdigit() for j in manifest["jobs"].values())
    check_finished_run(run_dir)
    run_id = json.loads((run_dir / "plan.json").read_text())["tracking"]["run_ids"]["train"]
    assert [p.name.endswith("-" + run_id) for p in (run_dir / "wandb").glob("offline-run-*")] == [True]

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
    result = run_cli("submit", "demo", "--wait", "--poll", "2", cwd=in_tmp, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "STEP" in out and "COMPLETED" in out and "loss plot: " in out
    run_dir = next(Path(os.environ["SFTJOBS_JOBS_DIR"]).iterdir())
    check_finished_run(run_dir)
    # the training log was tee'd into the run directory
    assert "train_loss" in (run_dir / "logs" / "train" / "training.log").read_text()


@pytest.mark.slurm
def test_demo_chain_on_slurm_as_cpu_jobs(slurm, in_tmp):
    result = run_cli("submit", "demo", "--executor", "slurm", "--wait", "--poll", "3",
                     "--set", "resources.mem=3G", "--set", "resources.cpu_step_mem=2G", cwd=in_tmp, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = next(Path(os.environ["SFTJOBS_JOBS_DIR"]).iterdir())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["executor"] == "slurm" and all(j.isdigit() for j in manifest["jobs"].values())
    check_finished_run(run_dir)

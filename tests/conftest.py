import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def private_store(tmp_path_factory, monkeypatch):
    """The per-user store ($XDG_DATA_HOME/sftjobs) of every test is its own, never the user's."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg_data")))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run with an empty working directory: no ./configs of the user's, runs go to tmp/jobs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SFTJOBS_JOBS_DIR", str(tmp_path / "jobs"))
    return tmp_path


def run_cli(*args, cwd=None, env=None, timeout=120):
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "sftjobs", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def prepare_demo_run(root: Path, *sets: str) -> Path:
    """``sftjobs render demo`` into root/run with ``--set`` items, and its data and model steps done (tests then run
    the train step themselves); the run store is root/jobs."""
    import subprocess

    pytest.importorskip("llamafactory")
    env = {"SFTJOBS_JOBS_DIR": str(root / "jobs")}
    args = ["render", "demo", "--out", str(root / "run")]
    for item in sets:
        args += ["--set", item]
    result = run_cli(*args, cwd=root, env=env)
    assert result.returncode == 0, result.stderr
    for step in ("data", "model"):
        done = subprocess.run([sys.executable, "-m", "sftjobs.steps", step, "--run-dir", str(root / "run")],
                              cwd=root, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    return root / "run"


@pytest.fixture
def slurm():
    """The real test cluster; CI sets SFTJOBS_REQUIRE_SLURM=1 so a cluster that did not start fails, not skips."""
    from tests.slurm_helpers import slurm_ready

    if not slurm_ready():
        if os.environ.get("SFTJOBS_REQUIRE_SLURM") == "1":
            pytest.fail("the Slurm test cluster is not running (tests/slurm/start-slurm.sh)")
        pytest.skip("the Slurm test cluster is not running (tests/slurm/start-slurm.sh)")


@pytest.fixture
def urgent_partition(slurm):
    """A partition of a higher PriorityTier than the test cluster's (10 against 1), for one test only: its jobs
    preempt the others' (tests/slurm/start-slurm.sh sets PreemptType=preempt/partition_prio, PreemptMode=REQUEUE)."""
    import subprocess

    from tests.slurm_helpers import scontrol_partition

    subprocess.run(["scontrol", "delete", "PartitionName=urgent"], capture_output=True)  # a leftover of a crash
    nodes = scontrol_partition("debug")["Nodes"]
    subprocess.run(["scontrol", "create", "PartitionName=urgent", f"Nodes={nodes}", "PriorityTier=10",
                    "PreemptMode=OFF", "State=UP"], check=True)
    try:
        yield "urgent"
    finally:
        subprocess.run(["scancel", "--partition=urgent"], capture_output=True)
        subprocess.run(["scontrol", "delete", "PartitionName=urgent"], check=True)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run on the device machine only: where CUDA is missing they are deselected (neither run,
    skipped nor counted), so CI's count is the CPU tiers'."""
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if cuda:
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
        config.hook.pytest_deselected(items=gpu)

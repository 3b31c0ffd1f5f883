"""Against the real Slurm test cluster (8 CPUs, 8000M, 8 fake GPUs a node): submit reads the partition's nodes
before queueing anything (issue 18). A request no node can satisfy stops with the profile key and what the
partition has, and nothing of the run reaches the queue; whole-node GPU steps ask for the node."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sftjobs.cli import main
from sftjobs.executors.slurm import SINFO_LIMITS, SINFO_NODES
from sftjobs.executors.slurm_cluster import parse_partition_limits, parse_sinfo_json, parse_sinfo_nodes
from sftjobs.runs import read_manifest
from tests.slurm_helpers import FAKE_PYTHON, scontrol_job, wait_until
from tests.test_slurm_chain import all_done

pytestmark = pytest.mark.slurm


def jobs_from(workdir: Path) -> list[str]:
    """Every job Slurm knows (queued or accounted) that was submitted from this test's directory."""
    queued = subprocess.run(["squeue", "-h", "-a", "-o", "%i|%Z"], capture_output=True, text=True, check=True).stdout
    accounted = subprocess.run(["sacct", "-X", "-n", "-P", "-a", "-S", "now-1hour", "-o", "JobID,WorkDir"],
                               capture_output=True, text=True, check=True).stdout
    return [line.split("|")[0] for line in (queued + accounted).splitlines()
            if line.count("|") == 1 and line.split("|")[1] == str(workdir)]


def refused(capsys, in_tmp, profile: str, *sets: str) -> str:
    args = ["submit", profile, "--executor", "slurm", "--set", f"launcher.python={FAKE_PYTHON}"]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("sftjobs: error: ") and "Traceback" not in err
    assert "Nothing was queued" in err
    assert jobs_from(in_tmp) == [], "a refused run queued jobs"
    assert not Path(os.environ["SFTJOBS_JOBS_DIR"]).exists(), "a refused run wrote its run directory"
    return err


def test_prod_as_shipped_stops_before_queueing_naming_the_key(slurm, in_tmp, capsys):
    # prod's GPU steps take whole nodes (fits any node); its data and model steps ask 16G, more than 8000M
    args = ["submit", "prod", "--dry-run-first", "--executor", "slurm"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "step data asks for 16G of memory on a node (resources.cpu_step_mem)" in err
    assert "partition debug" in err and "2 nodes with 8 CPUs, 8000M memory, 8 GPUs" in err
    assert jobs_from(in_tmp) == [] and not Path(os.environ["SFTJOBS_JOBS_DIR"]).exists()
    # --preview shows the same check, and says so in its exit code
    assert main([*args, "--preview"]) == 2
    out, err = capsys.readouterr()
    assert "# cluster check: submit would refuse this run: step data asks for 16G" in out
    assert "#SBATCH --exclusive" in out and "resources.cpu_step_mem" in err


def test_gpu_count_no_node_has_is_refused_with_nothing_queued(slurm, in_tmp, capsys):
    err = refused(capsys, in_tmp, "toy", "resources.max_gpus_per_node=16", "resources.gpus_per_node=12",
                  "resources.cpu_step_mem=300M", "resources.mem=500M", "resources.cpus_per_task=2")
    assert "step train asks for 12 GPUs on a node (resources.gpus_per_node)" in err and "8 GPUs" in err


def test_memory_no_node_has_is_refused_with_nothing_queued(slurm, in_tmp, capsys):
    err = refused(capsys, in_tmp, "toy", "resources.mem=9000M", "resources.cpu_step_mem=300M",
                  "resources.cpus_per_task=2")
    assert "step train asks for 9000M of memory on a node (resources.mem)" in err and "8000M memory" in err


def test_cpus_and_constraint_no_node_has_are_refused(slurm, in_tmp, capsys):
    err = refused(capsys, in_tmp, "toy", "resources.cpus_per_task=9", "resources.mem=500M",
                  "resources.cpu_step_mem=300M", "resources.cpu_step_cpus=1")
    assert "9 CPUs on a node (resources.cpus_per_task)" in err
    err = refused(capsys, in_tmp, "toy", "resources.constraint=a100", "resources.mem=500M",
                  "resources.cpu_step_mem=300M", "resources.cpus_per_task=2")
    assert "features 'a100' (resources.constraint)" in err


def test_prod_whole_node_steps_run_on_the_small_nodes(slurm, in_tmp, capsys):
    # only the CPU steps' memory is lowered: prod's own GPU request (8 GPUs, no mem, no CPUs) is kept
    args = ["submit", "prod", "--executor", "slurm"]
    for item in ["resources.cpu_step_mem=300M", "resources.cpu_step_cpus=1", "resources.time=00:10:00",
                 "resources.cpu_step_time=00:10:00", f"launcher.python={FAKE_PYTHON}"]:
        args += ["--set", item]
    assert main(args) == 0, capsys.readouterr().err
    run_id = next(line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("run "))
    manifest = read_manifest(Path(os.environ["SFTJOBS_JOBS_DIR"]) / run_id)
    try:
        check_whole_node_chain(capsys, manifest)
    finally:
        main(["cancel", run_id])  # a failed assertion leaves nothing queued on the shared cluster
        capsys.readouterr()


def check_whole_node_chain(capsys, manifest):
    jobs = manifest["jobs"]
    for step in ("preflight", "train"):  # the training job, preflight inside it
        job = scontrol_job(jobs[step])
        assert job["OverSubscribe"] == "NO", (step, job["OverSubscribe"])  # --exclusive
        assert job["MinMemoryNode"] == "0", (step, job["MinMemoryNode"])  # --mem=0
        assert "gpu:8" in job.get("TresPerNode", ""), job.get("TresPerNode")
    validate = scontrol_job(jobs["validate"])  # one GPU, the CPU steps' size: never the whole node
    assert validate["OverSubscribe"] == "OK" and validate["MinMemoryNode"] == "300M", validate
    assert "gpu:1" in validate.get("TresPerNode", ""), validate.get("TresPerNode")
    data = scontrol_job(jobs["data"])
    assert data["OverSubscribe"] == "OK" and data["MinMemoryNode"] == "300M"
    final = wait_until(lambda: all_done(capsys, manifest["run_id"]), 240, 2, "the chain to finish")
    assert set(final.values()) == {"COMPLETED"}, final
    # the whole node: every CPU and all of its memory
    alloc = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "AllocTRES", "-j", jobs["train"]], capture_output=True,
                           text=True).stdout
    assert "cpu=8" in alloc and "mem=8000M" in alloc and "gres/gpu=8" in alloc, alloc
    # ... and the step itself (srun inside the job) runs on all of it
    run_dir = Path(os.environ["SFTJOBS_JOBS_DIR"]) / manifest["run_id"]
    env = dict(line.split("=", 1) for line in (run_dir / "fake" / "train.0.env").read_text().splitlines())
    assert env["SLURM_CPUS_ON_NODE"] == "8" and env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7", env


def test_live_sinfo_parses_as_the_recorded_forms(slurm):
    parsable, default = parse_sinfo_nodes(subprocess.run(SINFO_NODES, capture_output=True, text=True).stdout)
    from_json = parse_sinfo_json(subprocess.run(["sinfo", "--json"], capture_output=True, text=True).stdout)
    key = lambda n: (n.name, n.cpus, n.mem_mb, n.gpus, n.features, tuple(sorted(n.partitions)))  # noqa: E731
    assert sorted(map(key, parsable)) == sorted(map(key, from_json))
    assert default == "debug" and {n.name for n in parsable} >= {"n1", "n2"}
    limits = parse_partition_limits(subprocess.run(SINFO_LIMITS, capture_output=True, text=True).stdout)
    assert limits["short"].max_minutes == 10 and limits["*default*"].name == "debug"

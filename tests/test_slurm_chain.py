"""Against the real Slurm test cluster: afterok chains, gres/gpu and node requests, 2-node ranks, broken
chains, partial sbatch failures, cancel, status with and without sacct. The step itself is a stand-in
(tests/slurm/fake_step_python.sh) where these tests need it to finish at once; Slurm's side is real."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sftjobs.cli import main
from sftjobs.runs import read_manifest
from tests.slurm_helpers import FAKE_PYTHON, SMALL, sacct_field, scontrol_job, wait_until

pytestmark = pytest.mark.slurm


def submit(capsys, profile: str, *extra: str, sets=(), fake=True) -> dict:
    args = ["submit", profile, "--executor", "slurm", *extra]
    for item in [*SMALL, *(["launcher.python=" + str(FAKE_PYTHON)] if fake else []), *sets]:
        args += ["--set", item]
    code = main(args)
    out = capsys.readouterr()
    assert code == 0, out.err
    run_id = next(line.split()[1] for line in out.out.splitlines() if line.startswith("run "))
    return read_manifest(Path(os.environ["SFTJOBS_JOBS_DIR"]) / run_id)


def status_json(capsys, run_id: str) -> dict:
    assert main(["status", run_id, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def states(capsys, run_id: str) -> dict[str, str]:
    return {row["step"]: row["state"] for row in status_json(capsys, run_id)["steps"]}


def all_done(capsys, run_id):
    current = states(capsys, run_id)
    terminal = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY"}
    return current if all(s.split()[0].split("[")[0] in terminal for s in current.values()) else None


def test_prod_chain_on_fake_8_gpu_nodes(slurm, in_tmp, capsys):
    manifest = submit(capsys, "prod", "--dry-run-first", sets=["resources.cpus_per_task=2"])
    jobs = manifest["jobs"]
    assert list(jobs) == ["data", "model", "preflight", "dry_run", "validate_dry_run", "train", "validate"]
    # five jobs: preflight and the dry run's validation run inside the dry run's job
    assert jobs["preflight"] == jobs["dry_run"] == jobs["validate_dry_run"] and len(set(jobs.values())) == 5
    # dependencies as Slurm sees them, while the chain is queued
    pre = scontrol_job(jobs["dry_run"])
    assert jobs["data"] in pre["Dependency"] and jobs["model"] in pre["Dependency"] and "afterok" in pre["Dependency"]
    assert "afterok:" + jobs["dry_run"] in scontrol_job(jobs["train"])["Dependency"]
    assert "afterok:" + jobs["train"] in scontrol_job(jobs["validate"])["Dependency"]
    train = scontrol_job(jobs["train"])
    assert "gres/gpu=8" in train["TRES"] or "gres/gpu:8" in train.get("TresPerNode", "")
    assert train["NumNodes"].split("-")[0] == "1"
    assert "gres/gpu" not in scontrol_job(jobs["data"])["TRES"]  # CPU steps ask for no GPU
    final = wait_until(lambda: all_done(capsys, manifest["run_id"]), 180, 2, "the chain to finish")
    assert set(final.values()) == {"COMPLETED"}, final
    assert "gres/gpu=8" in sacct_field(jobs["train"], "AllocTRES")
    run_dir = Path(os.environ["SFTJOBS_JOBS_DIR"]) / manifest["run_id"]
    env = (run_dir / "fake" / "train.0.env").read_text()
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7" in env and "NPROC_PER_NODE=8" in env and "FORCE_TORCHRUN=1" in env
    assert f"MASTER_PORT={20000 + int(jobs['train']) % 20000}" in env


def test_two_node_job_ranks_and_master(slurm, in_tmp, capsys, monkeypatch):
    # n1/n2 share this host's loopback: allowed here only, a real multi-node job fails fast on it
    monkeypatch.setenv("SFTJOBS_ALLOW_LOOPBACK_MASTER", "1")
    manifest = submit(capsys, "prod", sets=["resources.nodes=2", "resources.gpus_per_node=2"])
    final = wait_until(lambda: all_done(capsys, manifest["run_id"]), 180, 2, "the chain to finish")
    assert set(final.values()) == {"COMPLETED"}, final
    run_dir = Path(os.environ["SFTJOBS_JOBS_DIR"]) / manifest["run_id"]
    envs = [dict(line.split("=", 1) for line in (run_dir / "fake" / f"train.{rank}.env").read_text().splitlines())
            for rank in (0, 1)]
    assert [e["NODE_RANK"] for e in envs] == ["0", "1"]
    assert envs[0]["MASTER_ADDR"] == envs[1]["MASTER_ADDR"] == "n1"
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]
    assert envs[0]["NNODES"] == "2" and envs[0]["NPROC_PER_NODE"] == "2"
    assert sacct_field(manifest["jobs"]["train"], "NNodes") == "2"


def test_multi_node_master_on_loopback_fails_fast(slurm, in_tmp, capsys, monkeypatch):
    monkeypatch.delenv("SFTJOBS_ALLOW_LOOPBACK_MASTER", raising=False)
    manifest = submit(capsys, "prod", sets=["resources.nodes=2", "resources.gpus_per_node=1"])
    final = wait_until(lambda: all_done(capsys, manifest["run_id"]), 180, 2, "the chain to finish")
    assert final["train"].startswith("FAILED") and final["validate"].startswith("CANCELLED")
    run_dir = Path(os.environ["SFTJOBS_JOBS_DIR"]) / manifest["run_id"]
    log = (run_dir / "slurm" / "train" / f"{manifest['jobs']['train']}_0_log.out").read_text()
    assert "MASTER_ADDR n1 resolves to" in log


def test_failing_step_cancels_the_rest_and_status_says_why(slurm, in_tmp, capsys):
    # the real data step fails at once on an empty file; it cancels its dependants itself (a missing file or model
    # folder is refused by submit before anything is queued, so they exist here, empty)
    data, model = in_tmp / "data.jsonl", in_tmp / "model"
    data.write_text("")
    model.mkdir()
    manifest = submit(capsys, "toy", fake=False, sets=["data.source=path", f"data.path={data}",
                                                       "model.source=path", f"model.path={model}"])
    final = wait_until(lambda: all_done(capsys, manifest["run_id"]), 120, 2, "the chain to end")
    assert final["data"].startswith("FAILED")
    for step in ("preflight", "train", "validate"):
        assert final[step].startswith("CANCELLED"), final
    report = status_json(capsys, manifest["run_id"])
    note = " ".join(report["notes"])
    assert f"run {manifest['run_id']}: step data failed with exit code 1 (" in note and str(data) in note
    assert "; preflight, train, validate did not run." in note


def test_status_cancels_a_chain_left_pending_by_a_killed_step(slurm, in_tmp, capsys):
    # the stand-in step fails without sftjobs' own handler: its dependants sit DependencyNeverSatisfied
    # (this cluster has no kill_invalid_depend) until status notices and cancels them
    os.environ["FAKE_KILL_JOB"] = "train"  # toy's training job (preflight, then train) dies before sftjobs starts
    try:
        manifest = submit(capsys, "toy")
    finally:
        del os.environ["FAKE_KILL_JOB"]
    jobs = manifest["jobs"]
    wait_until(lambda: "DependencyNeverSatisfied" in scontrol_job(jobs["validate"]).get("Reason", ""), 120, 2,
               "validate to become DependencyNeverSatisfied")
    report = status_json(capsys, manifest["run_id"])
    assert any("step train failed with exit code 1 (fake crash of job train); validate did not run" in n
               for n in report["notes"]), report["notes"]
    by_step = {row["step"]: row for row in report["steps"]}
    assert by_step["preflight"]["state"] == "CANCELLED"  # its job died before it could run
    wait_until(lambda: scontrol_job(jobs["validate"])["JobState"] == "CANCELLED", 30, 1, "validate cancelled")


def test_sbatch_refusal_midway_cancels_what_was_queued(slurm, in_tmp, capsys, monkeypatch, tmp_path):
    # data and model ask for no GPU and are queued; the training job asks for 12 GPUs on 8-GPU nodes and is refused.
    # submit's own check (tests/test_slurm_nodes.py) refuses that before queueing; this is the net behind it,
    # for what sinfo cannot tell: here sinfo fails, so sbatch is the only judge.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "sinfo").write_text("#!/bin/sh\necho 'sinfo: error: slurm_load_partitions: timeout' >&2\nexit 1\n")
    (fake_bin / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    args = ["submit", "toy", "--executor", "slurm", "--set", "resources.max_gpus_per_node=16",
            "--set", "resources.gpus_per_node=12", "--set", "launcher.python=" + str(FAKE_PYTHON)]
    for item in SMALL:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "sbatch refused step train" in err and "cancelled the 2 job(s)" in err
    ids = err.split("already queued (")[1].split(")")[0].split(", ")
    for job_id in ids:
        wait_until(lambda j=job_id: sacct_field(j, "State").startswith("CANCELLED"), 30, 1, f"job {job_id} cancelled")
    run_dir = next(Path(os.environ["SFTJOBS_JOBS_DIR"]).iterdir())
    assert read_manifest(run_dir)["state"] == "submit_failed"


def test_cancel_and_status_without_sacct(slurm, in_tmp, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_SLEEP", "60")
    manifest = submit(capsys, "toy")
    jobs = manifest["jobs"]
    wait_until(lambda: scontrol_job(jobs["data"])["JobState"] == "RUNNING", 60, 1, "data to run")
    # status with sacct broken: squeue still answers for the live jobs
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "sacct").write_text("#!/bin/sh\necho 'sacct: error: Problem talking to the database' >&2\nexit 1\n")
    (fake_bin / "sacct").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    report = status_json(capsys, manifest["run_id"])
    by_step = {row["step"]: row for row in report["steps"]}
    assert by_step["data"]["state"] == "RUNNING" and by_step["preflight"]["state"] == "PENDING"
    assert by_step["preflight"]["reason"] == "Dependency"
    monkeypatch.setenv("PATH", os.environ["PATH"].split(":", 1)[1])
    assert main(["cancel", manifest["run_id"]]) == 0
    assert "cancelled" in capsys.readouterr().out
    for step in jobs:
        wait_until(lambda s=step: sacct_field(jobs[s], "State").startswith("CANCELLED"), 60, 1, f"{step} cancelled")


def test_preview_prints_the_exact_sbatch_scripts(slurm, in_tmp, capsys):
    assert main(["submit", "prod", "--dry-run-first", "--executor", "slurm", "--preview",
                 "--set", "resources.cpu_step_mem=4G"]) == 0
    out = capsys.readouterr().out
    assert out.count("#!/bin/bash") == 5  # data, model, dry run (+ preflight, validation), train, validate
    assert "#SBATCH --dependency=afterok:DATA_JOBID:MODEL_JOBID" in out
    assert "#SBATCH --gpus-per-node=8" in out and "#SBATCH --signal=USR2@300" in out
    assert not Path(os.environ["SFTJOBS_JOBS_DIR"]).exists(), "a preview submits and writes nothing"


def test_preview_matches_the_recorded_sbatch_scripts(slurm, in_tmp, capsys):
    """Any change to what is sent to sbatch shows up as a diff of tests/golden/prod_preview.txt. prod as shipped
    does not fit the test cluster's 8000M nodes (its CPU steps ask 16G): the preview says so and exits 2."""
    import sys

    assert main(["submit", "prod", "--dry-run-first", "--executor", "slurm", "--preview",
                 "--set", "launcher.python=/usr/bin/python3"]) == 2
    out = capsys.readouterr().out
    run_id = out.split()[2]
    normalised = out.replace(str(in_tmp), "<TMP>").replace(run_id, "<RUN_ID>").replace(sys.executable, "<PYTHON>")
    normalised = normalised.replace(f"-{run_id[-4:]}:<RUN_ID>", "-<RUN4>:<RUN_ID>")  # job names: trn-36f3:<run id>
    golden = Path(__file__).parent / "golden" / "prod_preview.txt"
    if os.environ.get("SFTJOBS_UPDATE_GOLDEN"):
        golden.write_text(normalised)
    assert normalised == golden.read_text()


def test_no_time_in_the_profile_means_the_partitions_own_limit(slurm, in_tmp, capsys):
    # submitit would write its 5-minute default; sftjobs writes what Slurm gives a job without --time
    # (the preview exits 2: toy's data step asks 4 hours and preflight its fixed hour, over short's 10 minutes;
    # it still prints every script)
    assert main(["submit", "toy", "--executor", "slurm", "--preview", "--set", "resources.time=null",
                 "--set", "resources.partition=short"]) == 2
    out = capsys.readouterr().out
    assert "# cluster check: submit would refuse this run: step data asks for --time=04:00:00" in out
    train = out.split("# ===== step train =====")[1].split("# ===== step")[0]
    assert "#SBATCH --time=10" in train  # the short partition's MaxTime (it has no DefaultTime)
    assert main(["submit", "toy", "--executor", "slurm", "--preview", "--set", "resources.time=null",
                 "--set", "resources.mem=500M", "--set", "resources.cpu_step_mem=300M"]) == 0
    train = capsys.readouterr().out.split("# ===== step train =====")[1].split("# ===== step")[0]
    assert "#SBATCH --time=525600" in train  # an infinite partition: a year, never submitit's 5 minutes


def test_mail_on_the_last_job_and_fail_on_every_job(slurm, in_tmp, capsys):
    # the test cluster's MailProg is /bin/true: Slurm takes and records the request, nobody is mailed
    manifest = submit(capsys, "toy", "--dry-run-first",
                      sets=["resources.mail_type=END,TIME_LIMIT_80", "resources.mail_user=alice.smith+sft@example.org"])
    jobs = manifest["jobs"]
    for step, job_id in jobs.items():
        job = scontrol_job(job_id)
        assert job["MailUser"] == "alice.smith+sft@example.org", (step, job["MailUser"])
        want = {"END", "TIME_LIMIT_80", "FAIL"} if step == "validate" else {"FAIL"}
        assert set(job["MailType"].split(",")) == want, (step, job["MailType"])
    final = wait_until(lambda: all_done(capsys, manifest["run_id"]), 180, 2, "the chain to finish")
    assert set(final.values()) == {"COMPLETED"}, final

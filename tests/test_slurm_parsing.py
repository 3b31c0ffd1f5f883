"""squeue / sacct output recorded on the Slurm 22.05 test cluster (tests/fixtures/slurm/) -> status rows.

The recordings: one toy chain with 40 s steps; *_running while preflight ran (data, model done; train, validate
waiting on it); *_broken after train was cancelled while pending and preflight had completed; sacct_cancelled
after status cancelled validate (DependencyNeverSatisfied)."""

from __future__ import annotations

from pathlib import Path

from sftjobs.executors.base import StepState, duration_seconds, squeue_time
from sftjobs.executors.slurm import parse_sacct, parse_squeue, slurm_job_name

FIXTURES = Path(__file__).parent / "fixtures" / "slurm"


def merged(squeue: str, sacct: str) -> dict[str, StepState]:
    """What SlurmExecutor.snapshot does: sacct's rows, squeue's for the jobs it still lists."""
    found = parse_sacct((FIXTURES / sacct).read_text())
    found.update(parse_squeue((FIXTURES / squeue).read_text()))
    return found


def test_running_chain_shows_nodes_for_jobs_that_ran_and_reasons_for_waiting_ones():
    states = merged("squeue_running.txt", "sacct_running.txt")
    assert {j: s.where() for j, s in states.items()} == {
        "1": "n1", "2": "n1", "3": "n1", "4": "(Dependency)", "5": "(Dependency)"}
    assert states["3"].state == "RUNNING" and states["3"].elapsed == "0:18"


def test_finished_job_whose_sacct_reason_is_a_stale_dependency_shows_its_node():
    states = merged("squeue_broken.txt", "sacct_broken.txt")
    assert states["3"].reason == "Dependency"  # what sacct says for a job that waited, then ran
    assert states["3"].where() == "n1"
    assert states["4"].state == "CANCELLED" and states["4"].extra == {"cancelled_by_uid": "0"}
    assert states["4"].where() == "None assigned"  # sacct's NodeList for a job that never ran
    assert states["5"].where() == "(DependencyNeverSatisfied)"


def test_cancelled_chain_from_sacct_alone():
    states = parse_sacct((FIXTURES / "sacct_cancelled.txt").read_text())
    assert [s.state for s in states.values()] == ["COMPLETED", "COMPLETED", "COMPLETED", "CANCELLED", "CANCELLED"]
    assert [s.where() for s in states.values()] == ["n1", "n1", "n1", "None assigned", "None assigned"]
    assert [s.elapsed for s in states.values()] == ["0:41", "0:41", "0:40", "0:00", "0:00"]


def test_one_time_format_squeue_s():
    assert [squeue_time(s) for s in (0, 41, 3599, 3600, 86399, 90061)] == [
        "0:00", "0:41", "59:59", "1:00:00", "23:59:59", "1-01:01:01"]
    for text, seconds in (("00:00:41", 41), ("0:18", 18), ("1:02:03", 3723), ("1-01:01:01", 90061)):
        assert duration_seconds(text) == seconds


def test_job_names_tell_steps_and_runs_apart_in_squeue_s_8_characters():
    steps = ["data", "model", "preflight", "dry_run", "validate_dry_run", "train", "validate"]
    runs = ["prod-20261203-130642-36f3", "prod-20261203-130642-9b01"]
    shown = {slurm_job_name(step, run)[:8] for step in steps for run in runs}
    assert len(shown) == len(steps) * len(runs)
    assert slurm_job_name("train", runs[0]) == "trn-36f3:prod-20261203-130642-36f3"


def test_a_training_run_fits_80_columns_and_only_a_running_step_has_an_eta():
    from sftjobs.status import StepRow, fit_table

    run = "prod-20261203-130642-36f3"
    progress = {"current_steps": 1500, "total_steps": 3000, "loss": 1.0969, "remaining_time": "1:02:03"}
    gpu = {"gpus": [{"util": 97, "mem_used_mib": 70000}]}
    rows = [StepRow(run, "validate_dry_run", "1234567", StepState("COMPLETED", elapsed="1:02", nodes=1, nodelist="n1",
                                                                   restarts=1)),
            StepRow(run, "train", "1234568", StepState("RUNNING", elapsed="1-02:03:04", nodes=2, nodelist="gpu-node-[017-018]"),
                    progress, gpu),
            StepRow(run, "dry_run", "1234566", StepState("CANCELLED", elapsed="4:00", nodes=1, nodelist="gpu-node-017"),
                    dict(progress), None)]
    lines = fit_table(rows, 80, {run: f"run {run}"}).splitlines()
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    header = lines[1].split()
    # GPU, NODES, JOBID and LOSS give way (--wide shows them); the training step's ETA stays
    assert header == ["STEP", "STATE", "TIME", "PROGRESS", "ETA", "NODELIST(REASON)"]
    train = dict(zip(header, lines[3].split(), strict=False))
    assert train["TIME"] == "1-02:03:04" and train["PROGRESS"] == "1500/3000"
    assert train["ETA"] == "1:02:03" and "1:02:03" not in lines[4]  # a cancelled step keeps no stale ETA
    assert lines[3].endswith(" gpu-node-[017-01")  # cut to fit, as squeue's %.16R would
    assert "COMPLETED[1]" in lines[2]
    wide = fit_table(rows, 200, {run: run}).splitlines()
    assert "GPU" in wide[1] and "97% 68.4G" in wide[3] and "gpu-node-[017-018]" in wide[3]

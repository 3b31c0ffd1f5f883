"""Experiment tracking (profile key ``tracking``) through the real train step's launch script and LLaMA-Factory on
the CPU, across a requeue: the demo's train step is started by its steps/train.sh, sent USR2 once a few steps
are logged (it saves that step and exits 75, as a job does before Slurm requeues it), started again (it resumes
from the saved step) and runs to the end. TensorBoard: one log directory in the run directory holds every step
exactly once. W&B (offline, as WANDB_MODE in the job's environment says): both launches log to the same run id."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from sftjobs.planning.tracking import WANDB_ID_MAX, wandb_run_id
from tests.conftest import prepare_demo_run, run_cli

MAX_STEPS = 300  # enough that the signal after step 3 lands mid-training on a fast CPU (~100 steps/s)
SETS = ["train.save_steps=1000", "train.logging_steps=1", f"train.max_steps={MAX_STEPS}",
        "train.dataloader_num_workers=0"]


def prepare(root: Path, tracking: str) -> Path:
    """A rendered demo run with tracking on and its data and model steps done."""
    return prepare_demo_run(root, f"tracking={tracking}", *SETS)


def job_env(**extra: str) -> dict[str, str]:
    """The environment a job starts with: the user's, without any tracking settings of this machine's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TENSORBOARD_"))}
    return {**env, **extra}


def launch(run: Path, env: dict[str, str]) -> subprocess.Popen:
    """The train step as a job runs it: its launch script (which execs the step's python in the same process)."""
    return subprocess.Popen(["bash", str(run / "steps" / "train.sh")], cwd=run, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def output_dir(run: Path) -> Path:
    return Path(json.loads((run / "plan.json").read_text())["paths"]["output_dir"])


def logged_steps(out: Path) -> list[int]:
    path = out / "trainer_log.jsonl"
    if not path.exists():
        return []
    return [r["current_steps"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def requeue_once(run: Path, env: dict[str, str], between=None) -> int:
    """USR2 after 3 logged steps (saves that step, exit 75), then the relaunch trains to the end; the saved step."""
    from tests.test_signal_save import wait_for

    out = output_dir(run)
    first = launch(run, env)
    wait_for(lambda: len(logged_steps(out)) >= 3, 600, "step 3", first)
    first.send_signal(signal.SIGUSR2)
    text, _ = first.communicate(timeout=600)
    assert first.returncode == 75, text[-3000:]
    stopped_at = json.loads((run / "reports" / "stops" / "train.json").read_text())["step"]
    assert 0 < stopped_at < MAX_STEPS
    if between is not None:
        between(stopped_at)
    second = launch(run, env)
    text, _ = second.communicate(timeout=900)
    assert second.returncode == 0, text[-3000:]
    assert "resuming from" in text
    steps = logged_steps(out)
    assert sorted(set(steps)) == list(range(1, MAX_STEPS + 1)) and len(steps) == MAX_STEPS, Counter(steps)
    return stopped_at


def tensorboard_loss_steps(logdir: Path) -> list[int]:
    """Every train/loss step in every event file of ``logdir``, as written (no purging of repeats)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("summary") and any(v.tag == "train/loss" for v in event.summary.value):
                steps.append(event.step)
    return steps


@pytest.mark.train
def test_tensorboard_logs_every_step_once_into_the_run_directory_across_a_requeue(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = prepare(tmp_path, "tensorboard")
    logdir = run / "tensorboard" / "train"
    assert json.loads((run / "plan.json").read_text())["tracking"]["logdirs"]["train"] == str(logdir)

    def before_the_relaunch(stopped_at: int) -> None:
        assert tensorboard_loss_steps(logdir) == list(range(1, stopped_at + 1))

    requeue_once(run, job_env(), before_the_relaunch)
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2  # one file per launch, one directory
    steps = tensorboard_loss_steps(logdir)
    assert steps == list(range(1, MAX_STEPS + 1)), Counter(steps)  # each step once, in order
    accumulator = EventAccumulator(str(logdir))
    accumulator.Reload()
    assert [s.step for s in accumulator.Scalars("train/loss")] == list(range(1, MAX_STEPS + 1))
    assert not list(output_dir(run).rglob("events.out.tfevents.*"))  # nothing under the checkpoints


def wandb_offline_runs(wandb_root: Path) -> list[Path]:
    return sorted(wandb_root.glob("offline-run-*"))


def run_id_of(run_dir: Path) -> str:
    """The id W&B gave an offline run: its directory ends in it, and its log file is named after it."""
    (log,) = run_dir.glob("run-*.wandb")
    run_id = log.name[len("run-"):-len(".wandb")]
    assert run_dir.name.endswith("-" + run_id)
    return run_id


@pytest.mark.train
def test_wandb_offline_keeps_one_run_id_across_a_requeue(tmp_path):
    try:
        import wandb  # noqa: F401
    except ImportError:
        pytest.skip("wandb is not installed (pip install '.[track]'); the W&B requeue test needs it")
    run = prepare(tmp_path, "wandb")
    expected = json.loads((run / "plan.json").read_text())["tracking"]["run_ids"]["train"]
    assert expected == wandb_run_id(json.loads((run / "plan.json").read_text())["run_id"], "train")
    env = job_env(WANDB_MODE="offline", WANDB_SILENT="true")
    first_ids = []

    def before_the_relaunch(stopped_at: int) -> None:
        runs = wandb_offline_runs(run / "wandb")
        assert len(runs) == 1, runs
        first_ids.append(run_id_of(runs[0]))

    requeue_once(run, env, before_the_relaunch)
    runs = wandb_offline_runs(run / "wandb")
    assert len(runs) == 2, runs  # one per launch, as offline W&B does; `wandb sync` joins them into one run
    assert first_ids == [expected] and [run_id_of(r) for r in runs] == [expected, expected]
    secrets = [p for p in run.rglob("*") if p.is_file() and p.suffix in (".sh", ".yaml", ".json")
               and "WANDB_API_KEY" in p.read_text(errors="replace")]
    assert not secrets, secrets


def test_wandb_run_ids_are_fixed_per_run_and_step_and_safe():
    assert wandb_run_id("demo-20261204-120000-abcd", "train") == "demo-20261204-120000-abcd-train"
    assert wandb_run_id("demo-20261204-120000-abcd", "dry_run") != wandb_run_id("demo-20261204-120000-abcd", "train")
    long = wandb_run_id("p" * 100 + "-20261204-120000-abcd", "train")
    assert len(long) <= WANDB_ID_MAX and long == wandb_run_id("p" * 100 + "-20261204-120000-abcd", "train")
    assert wandb_run_id("a/b:c", "train") == "a_b_c-train"


@pytest.mark.parametrize("tracking", ["none", "tensorboard", "wandb"])
def test_each_tracking_renders_its_report_to_and_exports(tmp_path, tracking):
    import yaml

    result = run_cli("render", "demo", "--dry-run-first", "--out", str(tmp_path / "run"), "--set",
                     f"tracking={tracking}", cwd=tmp_path, env={"SFTJOBS_JOBS_DIR": str(tmp_path / "jobs")})
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    plan = json.loads((run / "plan.json").read_text())
    for target, step in (("train", "train"), ("dry_run", "dry_run")):
        cfg = yaml.safe_load((run / "llamafactory" / f"{target}.yaml").read_text())
        assert cfg["report_to"] == tracking
        script = (run / "steps" / f"{step}.sh").read_text()
        assert ("export WANDB_DISABLED=true" in script) == (tracking != "wandb")
        assert ("TENSORBOARD_LOGGING_DIR" in script) == (tracking == "tensorboard")
        if tracking == "none":
            assert "run_name" not in cfg and "tracking" not in plan
        else:
            assert cfg["run_name"].startswith(plan["run_id"])
        if tracking == "wandb":
            assert f"export WANDB_RUN_ID={plan['tracking']['run_ids'][step]}\n" in script
            assert "export WANDB_RESUME=allow" in script and "export WANDB_MODE" not in script
        if tracking == "tensorboard":
            assert f"export TENSORBOARD_LOGGING_DIR={run}/tensorboard/{step}\n" in script
    for step in ("data", "model", "validate"):  # jobs that train nothing never log anywhere (preflight: in train's)
        assert "export WANDB_DISABLED=true" in (run / "steps" / f"{step}.sh").read_text()
    subprocess.run(["bash", "-n", str(run / "steps" / "train.sh")], check=True)


def test_a_run_directory_with_spaces_and_quotes_stays_one_shell_word(tmp_path):
    out = tmp_path / "it's a run"
    result = run_cli("render", "demo", "--out", str(out), "--set", "tracking=wandb", cwd=tmp_path,
                     env={"SFTJOBS_JOBS_DIR": str(tmp_path / "jobs")})
    assert result.returncode == 0, result.stderr
    script = (out / "steps" / "train.sh").read_text()
    probe = script.split("export HF_DATASETS_CACHE")[0].replace("set -euo pipefail", "set -eu") + 'echo "$WANDB_DIR"\n'
    env = {k: v for k, v in os.environ.items() if k != "WANDB_DIR"}
    shown = subprocess.run(["bash", "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert shown.strip() == str(out)
    shown = subprocess.run(["bash", "-c", probe], env={**env, "WANDB_DIR": "/elsewhere"}, capture_output=True,
                           text=True, check=True).stdout
    assert shown.strip() == "/elsewhere"  # the job's environment wins


@pytest.mark.parametrize("sets, words", [
    (["tracking=mlflow"], ["'tracking'", "none, tensorboard, wandb", "mlflow"]),
    (["tracking=true"], ["'tracking'", "a string"]),
    (["train.report_to=wandb"], ["train.report_to", "use tracking"]),
    (["train.logging_dir=/tmp/tb"], ["train.logging_dir", "tracking: tensorboard"]),
])
def test_a_bad_tracking_value_is_one_message_and_exit_2(tmp_path, sets, words):
    args = ["render", "demo", "--out", str(tmp_path / "run")]
    for item in sets:
        args += ["--set", item]
    result = run_cli(*args, cwd=tmp_path, env={"SFTJOBS_JOBS_DIR": str(tmp_path / "jobs")})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and all(w in result.stderr for w in words), result.stderr
    assert not (tmp_path / "run").exists()


def test_status_says_where_the_tracking_logs_go():
    from sftjobs.status import tracking_note

    assert tracking_note(None) is None
    note = tracking_note({"kind": "tensorboard", "tensorboard_dir": "/r/tensorboard",
                          "logdirs": {"train": "/r/tensorboard/train"}})
    assert "/r/tensorboard" in note and "tensorboard --logdir /r/tensorboard" in note
    note = tracking_note({"kind": "wandb", "wandb_dir": "/r", "run_ids": {"train": "x-train"}})
    assert "x-train" in note and "/r/wandb" in note


def test_preflight_refuses_a_tracking_whose_package_the_node_lacks(monkeypatch):
    import importlib.util

    from sftjobs.errors import SftjobsError
    from sftjobs.steps.preflight import check_tracking_packages

    check_tracking_packages({"report_to": "none"})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SftjobsError, match=r"tracking: wandb needs the wandb package.*\.\[track\]"):
        check_tracking_packages({"report_to": ["wandb"]})


@pytest.mark.parametrize("version, yaml_text, overrides, expected", [
    ("4.56.2", "report_to: tensorboard\n", [], ["logging_dir=/r/tensorboard/train"]),
    ("4.56.2", "report_to: tensorboard\n", ["resume_from_checkpoint=/o/checkpoint-5"],
     ["logging_dir=/r/tensorboard/train"]),
    ("5.5.4", "report_to: tensorboard\n", [], []),  # transformers 5 reads TENSORBOARD_LOGGING_DIR itself
    ("4.56.2", "logging_dir: /mine\n", [], []),  # a YAML written by hand that names its own folder keeps it
    ("4.56.2", "report_to: tensorboard\n", ["logging_dir=/mine"], []),
])
def test_transformers_4_gets_the_tensorboard_folder_as_logging_dir(tmp_path, monkeypatch, version, yaml_text,
                                                                   overrides, expected):
    """transformers 4's TensorBoard callback reads TrainingArguments.logging_dir, not TENSORBOARD_LOGGING_DIR (the
    train tier runs the real one on each version: tests/version_matrix.sh)."""
    from sftjobs.trainer import entry, patches

    config = tmp_path / "train.yaml"
    config.write_text(yaml_text)
    monkeypatch.setattr(patches, "installed_version", lambda package: version)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "/r/tensorboard/train")
    assert entry.tensorboard_logging_dir(str(config), overrides) == expected
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR")
    assert entry.tensorboard_logging_dir(str(config), overrides) == []

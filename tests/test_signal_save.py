"""Save at the signal, through the real train step and LLaMA-Factory on the CPU: USR2 (a time limit's warning) or
SIGTERM (a preemption) makes training save a complete checkpoint of the step it is on and stop; the next launch
resumes from it and trains no step twice. Signals go to every process of the step at once, as Slurm sends
them, or to one process only (torchrun forwards nothing); two ranks agree on the step to stop at."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.conftest import prepare_demo_run

pytestmark = pytest.mark.train
# 400 steps: the signals after step 3-4 land mid-training even at ~100 steps/s
MAX_STEPS = 400
SETS = ["train.save_steps=1000", "train.logging_steps=1", f"train.max_steps={MAX_STEPS}", "train.dataloader_num_workers=1"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A rendered demo run with its data and model steps done (the train step is run by each test)."""
    root = tmp_path_factory.mktemp("signal_save")
    prepare_demo_run(root, *SETS)
    return root


def fresh_run(prepared: Path, name: str, zero2: bool = False) -> Path:
    """A copy of the prepared run directory whose output_dir is its own; ``zero2``: under real DeepSpeed ZeRO-2
    (gloo on the CPU), as prod trains (its checkpoint holds each rank's optimizer partition)."""
    import shutil

    from sftjobs.templating import render_template

    run = prepared / name
    shutil.copytree(prepared / "run", run, symlinks=True)
    plan = json.loads((run / "plan.json").read_text())
    out = run / "ckpt"
    if zero2:
        (run / "ds_z2.json").write_text(render_template("deepspeed.json.j2", stage=2, offload=False))
    for path in run.rglob("*.yaml"):
        text = path.read_text().replace(plan["paths"]["output_dir"], str(out))
        path.write_text(text + (f"deepspeed: {run / 'ds_z2.json'}\n" if zero2 else ""))
    plan["paths"]["output_dir"] = str(out)
    (run / "plan.json").write_text(json.dumps(plan))
    return run


def start_train(run: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sftjobs.steps", "train", "--run-dir", str(run)], cwd=run,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def logged_steps(out: Path) -> list[int]:
    path = out / "trainer_log.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["current_steps"] for r in records if "loss" in r]  # the last line without a loss is the run's summary


def wait_for(predicate, timeout: float, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the train step exited ({process.returncode}) before {what}: "
                                 f"{process.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def signal_tree(root_pid: int, sig: int) -> int:
    """Like Slurm: every process of the step at once (the runtime, torchrun, the workers, their loaders)."""
    procs = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    return len(procs)


def finish(run: Path, process: subprocess.Popen) -> tuple[int, str]:
    out, _ = process.communicate(timeout=600)
    return process.returncode, out


def assert_stopped_at_a_complete_checkpoint(run: Path, code: int, output: str) -> dict:
    out = run / "ckpt"
    assert code == 75, output[-3000:]  # EXIT_STOPPED: saved and stopped, not failed
    status = json.loads((run / "reports" / "status" / "train.json").read_text())
    assert status["state"] == "STOPPED" and "after saving checkpoint-" in status["message"], status
    marker = json.loads((run / "reports" / "stops" / "train.json").read_text())
    step = marker["step"]
    checkpoint = out / f"checkpoint-{step}"
    assert (checkpoint / "trainer_state.json").is_file()
    assert (checkpoint / "optimizer.pt").is_file() or any(checkpoint.glob("global_step*/*optim_states.pt"))
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert 0 < step < MAX_STEPS, marker
    assert max(logged_steps(out)) == step  # nothing trained after the saved step
    assert not (out / "train_results.json").exists()  # LLaMA-Factory's end-of-run save did not happen
    saves = [json.loads(line) for line in (run / "reports" / "saves-train.jsonl").read_text().splitlines()]
    assert saves[-1]["reason"] == "signal" and saves[-1]["step"] == step and saves[-1]["seconds"] > 0
    return marker


def resume_to_the_end(run: Path) -> list[int]:
    process = start_train(run)
    code, output = finish(run, process)
    assert code == 0, output[-3000:]
    assert "resuming from" in output
    state = json.loads((run / "ckpt" / "trainer_state.json").read_text())
    assert state["global_step"] == state["max_steps"] == MAX_STEPS
    return logged_steps(run / "ckpt")


def trained_twice(steps: list[int]) -> int:
    return sum(count - 1 for count in Counter(steps).values())


def test_usr2_to_the_step_saves_the_current_step_and_the_resume_repeats_none(prepared):
    run = fresh_run(prepared, "one_process")
    process = start_train(run)
    wait_for(lambda: len(logged_steps(run / "ckpt")) >= 4, 600, "step 4", process)
    process.send_signal(signal.SIGUSR2)  # to the step's runtime alone: it passes the signal on
    code, output = finish(run, process)
    assert "SIGUSR2 received" in output
    assert_stopped_at_a_complete_checkpoint(run, code, output)
    steps = resume_to_the_end(run)
    assert sorted(set(steps)) == list(range(1, MAX_STEPS + 1))
    assert trained_twice(steps) == 0, Counter(steps)


def test_two_ranks_stop_at_one_step_when_every_process_gets_sigterm(prepared):
    """SIGTERM to every process, as a preemption sends it: torchrun shuts its workers down, and they still save."""
    run = fresh_run(prepared, "two_ranks", zero2=True)
    env = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": "29671"}
    process = start_train(run, **env)
    wait_for(lambda: len(logged_steps(run / "ckpt")) >= 3, 600, "step 3", process)
    signal_tree(process.pid, signal.SIGTERM)
    code, output = finish(run, process)
    marker = assert_stopped_at_a_complete_checkpoint(run, code, output)
    checkpoint = run / "ckpt" / f"checkpoint-{marker['step']}"
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    assert len(list(checkpoint.glob("global_step*/*optim_states.pt"))) == 2  # both ranks' ZeRO-2 partitions
    process = start_train(run, **env)
    code, output = finish(run, process)
    assert code == 0, output[-3000:]
    steps = logged_steps(run / "ckpt")
    assert trained_twice(steps) == 0 and max(steps) == MAX_STEPS, Counter(steps)


def test_usr2_to_one_rank_only_stops_both_at_the_same_step_and_torchrun_survives_it(prepared):
    run = fresh_run(prepared, "one_rank", zero2=True)
    env = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": "29673"}
    process = start_train(run, **env)
    wait_for(lambda: len(logged_steps(run / "ckpt")) >= 3, 600, "step 3", process)
    launcher = psutil.Process(process.pid).children()[0]  # torchrun
    launcher.send_signal(signal.SIGUSR2)  # ignored by torchrun: it must not die of it
    launcher.children()[-1].send_signal(signal.SIGUSR2)  # one worker
    code, output = finish(run, process)
    assert_stopped_at_a_complete_checkpoint(run, code, output)


def test_a_signal_during_a_periodic_save_leaves_every_checkpoint_usable(prepared):
    run = fresh_run(prepared, "during_save")
    configs = list(run.rglob("*.yaml"))
    for path in configs:
        path.write_text(path.read_text().replace("save_steps: 1000", "save_steps: 5"))
    process = start_train(run)
    wait_for(lambda: (run / "ckpt" / "checkpoint-5").is_dir(), 600, "checkpoint-5 being written", process)
    signal_tree(process.pid, signal.SIGUSR2)
    code, output = finish(run, process)
    marker = assert_stopped_at_a_complete_checkpoint(run, code, output)
    assert marker["step"] >= 5
    for checkpoint in (run / "ckpt").glob("checkpoint-*"):
        assert (checkpoint / "trainer_state.json").is_file(), f"{checkpoint.name} incomplete"
    for path in configs:  # the resume without a save every 5 steps (a checkpoint per 5 of 400 steps is only disk)
        path.write_text(path.read_text().replace("save_steps: 5", "save_steps: 1000"))
    steps = resume_to_the_end(run)
    assert trained_twice(steps) == 0, Counter(steps)

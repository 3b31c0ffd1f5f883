"""Issue 19, items 8 and 9: logs folds progress bars and -f follows the chain; --version, help on every argument,
a closed pipe without a traceback, Ctrl-C during submit --wait leaves the run going and says how to watch it."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from sftjobs import __version__
from sftjobs.cli import build_parser, main
from tests.conftest import run_cli
from tests.slurm_helpers import wait_until
from tests.test_local_executor import FAKE, finished, step_states, submit

STEPS = ["data", "model", "preflight", "train", "validate"]


def test_logs_fold_carriage_return_progress_to_its_last_state(in_tmp, capsys):
    run_dir = submit(in_tmp)
    wait_until(lambda: finished(capsys, run_dir), 60, 0.5, "the local chain")
    bar = "".join(f"\rtrain:  {p:3d}%|{'#' * (p // 10):<10}| {p}/100" for p in range(0, 101, 5))
    (run_dir / "logs" / "train.log").write_text(f"starting\n{bar}\nsaved\r\nupdate 1\rupdate 2\r\ndone\n")
    assert main(["logs", run_dir.name, "train"]) == 0
    out = capsys.readouterr().out
    assert "\r" not in out
    assert out.splitlines() == ["starting", "train:  100%|##########| 100/100", "saved", "update 2", "done"]
    assert main(["logs", run_dir.name, "train", "--raw"]) == 0
    assert capsys.readouterr().out.count("\r") == 24


def test_logs_follow_goes_from_step_to_step_until_the_chain_ends(in_tmp):
    run_dir = submit(in_tmp, env={"FAKE_SLEEP": "1"})
    result = run_cli("logs", run_dir.name, "-f", cwd=in_tmp, timeout=120)
    assert result.returncode == 0, result.stderr
    done = [line.split()[2] for line in result.stdout.splitlines() if line.startswith("fake step ")]
    assert done == STEPS, result.stdout
    headers = [line for line in result.stderr.splitlines() if line.startswith("==> ")]
    # one log per job: preflight's is its training job's
    assert [h.split("/")[-1].split(".")[0] for h in headers] == ["data", "model", "train", "validate"]


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"sftjobs {__version__}"


def test_every_subcommand_and_argument_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helped = {c.dest for c in sub._choices_actions if c.help}
    assert helped == set(sub.choices), f"subcommands without help: {set(sub.choices) - helped}"
    missing = []
    for name, command in [("sftjobs", parser), *sub.choices.items()]:
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {action.option_strings or action.dest}")
    assert not missing, f"arguments without help: {missing}"


def test_a_closed_pipe_ends_the_command_quietly(in_tmp):
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    for args in (["profiles"], ["--help"], ["status", "--all"]):
        proc = subprocess.Popen([sys.executable, "-m", "sftjobs", *args], cwd=in_tmp, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # as `| head` does once it has its lines: every write of the command fails
        stderr = proc.stderr.read().decode()
        proc.wait(timeout=60)
        assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_ctrl_c_during_submit_wait_leaves_the_run_going(in_tmp, capsys):
    env = {**os.environ, "FAKE_SLEEP": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "sftjobs", "submit", "toy", *FAKE, "--wait", "--poll", "0.5"],
                            cwd=in_tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_id = None
    for line in proc.stdout:
        if line.startswith("run "):
            run_id = line.split()[1]
        if line.startswith("["):  # waiting
            break
    assert run_id, proc.stderr.read()
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"run {run_id} goes on" in err
    for command in (f"sftjobs status {run_id}", f"sftjobs logs {run_id} -f", f"sftjobs cancel {run_id}"):
        assert command in err, err
    run_dir = in_tmp / "jobs" / run_id
    try:
        rows = wait_until(lambda: finished(capsys, run_dir), 90, 0.5, "the chain after Ctrl-C")
    except AssertionError as timed_out:  # say where the chain stood, and what the runner logged
        logs = {p.name: p.read_text()[-1500:] for p in sorted((run_dir / "logs").glob("*"))}
        raise AssertionError(f"{timed_out}: {step_states(capsys, run_dir)}\n{logs}") from None
    assert {r["state"] for r in rows.values()} == {"COMPLETED"}

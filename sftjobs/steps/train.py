"""The train step: ``llamafactory-cli train`` with the run's YAML, resuming from the newest complete checkpoint.

Restarts (requeue, preemption, time limit) land here again: a checkpoint that was being written when the job
died has no trainer_state.json yet, so it is moved aside (never deleted) and the one before it is used.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from sftjobs.errors import SftjobsError
from sftjobs.steps.context import StepContext
from sftjobs.steps.monitor import Sampler

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def is_complete_checkpoint(path: Path) -> bool:
    """HF Trainer writes trainer_state.json last (after weights, optimizer and scheduler)."""
    if not (path / "trainer_state.json").is_file():
        return False
    has_weights = any((path / name).exists() for name in WEIGHT_FILES) or any(path.glob("global_step*"))
    return has_weights


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            match = _CHECKPOINT.match(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
    return sorted(found)


def newest_complete_checkpoint(output_dir: Path, log=print) -> Path | None:
    """The newest checkpoint that finished saving; incomplete newer ones are renamed out of the way."""
    for _number, path in reversed(checkpoints(output_dir)):
        if is_complete_checkpoint(path):
            return path
        aside = path.with_name(f"incomplete-{path.name}-{int(time.time())}")
        path.rename(aside)
        log(f"{path.name} was interrupted while saving; moved it to {aside.name} and resume from an earlier one")
    return None


def llamafactory_command(config: Path, resume: Path | None) -> list[str]:
    cli = shutil.which("llamafactory-cli") or str(Path(sys.executable).with_name("llamafactory-cli"))
    command = [cli, "train", str(config)]
    if resume is not None:
        command.append(f"resume_from_checkpoint={resume}")
    return command


def run(ctx: StepContext) -> None:
    config = ctx.training_config_path()
    output_dir = ctx.output_dir()
    resume = newest_complete_checkpoint(output_dir, log=ctx.log) if ctx.node_rank == 0 else None
    if ctx.node_rank != 0:
        # every node must pass the same resume flag: read what the checkpoints say, do not move anything
        complete = [p for _, p in checkpoints(output_dir) if is_complete_checkpoint(p)]
        resume = complete[-1] if complete else None
    command = llamafactory_command(config, resume)
    log_dir = ctx.run_dir / "logs" / ctx.step.name
    log_dir.mkdir(parents=True, exist_ok=True)
    training_log = log_dir / ("training.log" if ctx.node_rank == 0 else f"training.node{ctx.node_rank}.log")
    ctx.log(("resuming from " + str(resume)) if resume else f"starting {ctx.step.target} training into {output_dir}")
    ctx.log("$ " + " ".join(command) + f"  (log: {training_log})")
    monitor = ctx.run_dir / "monitor" / f"{ctx.step.name}-{socket.gethostname()}.jsonl"
    with open(training_log, "ab") as log_handle:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy())
        with Sampler(monitor, process.pid, output_dir):
            assert process.stdout is not None
            for chunk in iter(lambda: process.stdout.readline(), b""):
                log_handle.write(chunk)
                log_handle.flush()
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            code = process.wait()
    if code != 0:
        tail = training_log.read_text(errors="replace").strip().splitlines()[-5:]
        raise SftjobsError(f"llamafactory-cli train exited with {code}. Last lines of {training_log}:\n  " + "\n  ".join(tail))
    ctx.log(f"training finished; outputs in {output_dir}")

"""The train step: LLaMA-Factory's training (sftjobs.trainer.entry: its run_exp(), as ``llamafactory-cli train``
runs it, plus sftjobs' speed.* additions) with the run's YAML, resuming from the newest complete checkpoint.
Distributed runs go through torchrun exactly as ``FORCE_TORCHRUN=1 llamafactory-cli train`` would start them.

Restarts (requeue, preemption, time limit) land here again: a checkpoint that was being written when the job
died has no trainer_state.json yet, so it is moved aside (never deleted) and the one before it is used.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from sftjobs.errors import SftjobsError
from sftjobs.node.context import StepContext
from sftjobs.node.monitor import Sampler

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


def _enabled(env: dict[str, str], name: str, default: str = "0") -> bool:
    """llamafactory-cli's reading of a switch variable (extras.misc.is_env_enabled)."""
    return env.get(name, default).lower() in ("1", "true", "y", "yes")


def is_distributed(env: dict[str, str]) -> bool:
    """llamafactory-cli's rule: torchrun when FORCE_TORCHRUN is set or more than one process is asked for."""
    return _enabled(env, "FORCE_TORCHRUN") or int(env.get("NPROC_PER_NODE", "1") or 1) > 1 or int(env.get("NNODES", "1") or 1) > 1


def launch_env(env: dict[str, str]) -> dict[str, str]:
    """llamafactory-cli's torchrun environment (its OPTIM_TORCH defaults), unless the user set them."""
    env = dict(env)
    if _enabled(env, "OPTIM_TORCH", "1"):
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        env.setdefault("TORCH_NCCL_AVOID_RECORD_STREAMS", "1")
    return env


def training_command(config: Path, resume: Path | None, speed: dict | None = None, memory_log: Path | None = None,
                     env: dict[str, str] | None = None, python: str | None = None) -> list[str]:
    """The command the train step runs on each node (as a list: nothing goes through a shell)."""
    env = os.environ if env is None else env
    python = python or sys.executable
    speed = speed or {}
    entry = ["-m", "sftjobs.trainer.entry"]
    if speed.get("balance_ranks"):
        entry.append("--balance-ranks")
    if speed.get("per_sample_attention"):
        entry.append("--per-sample-attention")
    if speed.get("pack_rank_samples"):
        entry.append("--pack-rank-samples")
    if speed.get("skip_idle_micro_steps"):
        entry.append("--skip-idle-micro-steps")
    if speed.get("split_long_samples"):
        entry.append("--split-long-samples")
    if speed.get("cudnn_attention_bucket"):
        entry += ["--cudnn-attention-bucket", str(int(speed["cudnn_attention_bucket"]))]
    if memory_log is not None:
        entry += ["--memory-log", str(memory_log)]
    entry.append(str(config))
    if resume is not None:
        # LLaMA-Factory reads key=value arguments as YAML (OmegaConf.from_cli): a path holding " #", ": " or a
        # newline is written as a quoted YAML scalar so it arrives as the same path (plain paths stay plain).
        from sftjobs.templating import yaml_scalar

        entry.append(f"resume_from_checkpoint={yaml_scalar(str(resume))}")
    if not is_distributed(env):
        return [python, *entry]
    torchrun = [python, "-m", "torch.distributed.run", "--nnodes", env.get("NNODES", "1"),
                "--node_rank", env.get("NODE_RANK", "0"), "--nproc_per_node", env.get("NPROC_PER_NODE", "1"),
                "--master_addr", env.get("MASTER_ADDR", "127.0.0.1"), "--master_port", env.get("MASTER_PORT", "29500")]
    return [*torchrun, *entry]


def run(ctx: StepContext) -> None:
    config = ctx.training_config_path()
    output_dir = ctx.output_dir()
    resume = newest_complete_checkpoint(output_dir, log=ctx.log) if ctx.node_rank == 0 else None
    if ctx.node_rank != 0:
        # every node must pass the same resume flag: read what the checkpoints say, do not move anything
        complete = [p for _, p in checkpoints(output_dir) if is_complete_checkpoint(p)]
        resume = complete[-1] if complete else None
    log_dir = ctx.run_dir / "logs" / ctx.step.name
    log_dir.mkdir(parents=True, exist_ok=True)
    memory_log = ctx.run_dir / "monitor" / "allocator" / f"{ctx.step.name}-{socket.gethostname()}"
    command = training_command(config, resume, ctx.profile.get("speed"), memory_log)
    training_log = log_dir / ("training.log" if ctx.node_rank == 0 else f"training.node{ctx.node_rank}.log")
    ctx.log(("resuming from " + str(resume)) if resume else f"starting {ctx.step.target} training into {output_dir}")
    ctx.log("$ " + shlex.join(command) + f"  (log: {training_log})")
    monitor = ctx.run_dir / "monitor" / f"{ctx.step.name}-{socket.gethostname()}.jsonl"
    with open(training_log, "ab") as log_handle:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=launch_env(os.environ))
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
        raise SftjobsError(f"LLaMA-Factory training exited with {code}. Last lines of {training_log}:\n  " + "\n  ".join(tail))
    ctx.log(f"training finished; outputs in {output_dir}")

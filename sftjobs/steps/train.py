"""The train step: LLaMA-Factory's training (sftjobs.trainer.entry: its run_exp(), as ``llamafactory-cli train``
runs it, plus sftjobs' speed.* additions) with the run's YAML, resuming from the newest complete checkpoint.
Distributed runs go through torchrun exactly as ``FORCE_TORCHRUN=1 llamafactory-cli train`` would start them.

Restarts (requeue, preemption, time limit) land here again: a checkpoint that was being written when the job
died has no trainer_state.json yet, so it is moved aside (never deleted) and the one before it is used.

Save at the signal: USR2 (the time limit's warning, ``scancel --signal=USR2``) or SIGTERM (preemption,
``scontrol requeue``, cancel) reaching this process is passed on as USR2 to every training process
(torchrun does not forward USR1/USR2 to its workers, and a batch-script-only signal reaches nothing else);
they save a checkpoint of the step they are on and exit (sftjobs.trainer.signal_save). torchrun itself is
started with USR2 ignored, so the signal Slurm sends to every process of the job does not kill it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from sftjobs.errors import SftjobsError, StepStopped
from sftjobs.fsutil import exclusive_lock
from sftjobs.node.context import StepContext
from sftjobs.node.monitor import Sampler
from sftjobs.trainer.entry import SPEED_SWITCHES, SPEED_VALUES, switch_flag
from sftjobs.waiting import wait_with_signals

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


def stop_marker_path(run_dir: Path, step: str) -> Path:
    """Written by the training's rank 0 after a save at a signal (sftjobs.trainer.signal_save)."""
    return run_dir / "reports" / "stops" / f"{step}.json"


def save_log_path(run_dir: Path, step: str) -> Path:
    """One JSON line per checkpoint save (step, seconds, periodic or at a signal)."""
    return run_dir / "reports" / f"saves-{step}.jsonl"


def training_command(config: Path, resume: Path | None, speed: dict | None = None, memory_log: Path | None = None,
                     env: dict[str, str] | None = None, python: str | None = None,
                     stop_marker: Path | None = None, save_log: Path | None = None,
                     callbacks: tuple[str, ...] = (), recompute_by_tokens: list[int] | None = None) -> list[str]:
    """The command the train step runs on each node (as a list: nothing goes through a shell). ``callbacks``
    (MODULE:FUNCTION factories of extra TrainerCallbacks) is for the benchmark, which runs this same command
    with its step timer (bench/train_command.py); the train step passes none. ``recompute_by_tokens`` is the
    memory plan's schedule (plan.json), passed on where speed.recompute_by_length is on."""
    env = os.environ if env is None else env
    python = python or sys.executable
    speed = speed or {}
    entry = ["-m", "sftjobs.trainer.entry"]
    entry += [switch_flag(key) for key in SPEED_SWITCHES if speed.get(key)]
    for key in SPEED_VALUES:
        if speed.get(key):
            entry += [switch_flag(key), str(int(speed[key]))]
    if speed.get("recompute_by_length") and recompute_by_tokens:
        entry += ["--recompute-by-length", ",".join(str(int(n)) for n in recompute_by_tokens)]
    if memory_log is not None:
        entry += ["--memory-log", str(memory_log)]
    if stop_marker is not None:
        entry += ["--stop-marker", str(stop_marker)]
    if save_log is not None:
        entry += ["--save-log", str(save_log)]
    for factory in callbacks:
        entry += ["--callback", factory]
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


class SignalRelay:
    """In this process, while training runs: USR2 or SIGTERM -> USR2 to every training process, again every
    ``every`` seconds until they exit (a process still loading when the first one came may have missed it)."""

    def __init__(self, process: subprocess.Popen, distributed: bool, log, every: float = 5.0,
                 marker: Path | None = None):
        self.process = process
        self.marker = marker  # once it exists the save is done: no more signals
        self.distributed = distributed
        self.log = log
        self.every = every
        self.received: str | None = None
        self._previous: dict[int, object] = {}
        self._wake = threading.Event()

    def __enter__(self) -> SignalRelay:
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._wake.set()

    def workers(self) -> list[psutil.Process]:
        try:
            launcher = psutil.Process(self.process.pid)
            return launcher.children() if self.distributed else [launcher]
        except psutil.NoSuchProcess:
            return []

    def forward(self) -> int:
        sent = 0
        for worker in self.workers():
            try:
                worker.send_signal(signal.SIGUSR2)
                sent += 1
            except psutil.NoSuchProcess:
                pass
        return sent

    def _on_signal(self, signum: int, _frame) -> None:
        first = self.received is None
        self.received = self.received or signal.Signals(signum).name
        sent = self.forward()
        if first:
            self.log(f"{signal.Signals(signum).name} received: asked {sent} training process(es) to save a "
                     "checkpoint at the end of this optimizer step and stop")
            threading.Thread(target=self._repeat, daemon=True).start()

    def _repeat(self) -> None:
        while not self._wake.wait(self.every) and self.process.poll() is None:
            if self.marker is not None and self.marker.exists():
                return
            self.forward()


def copy_output(stream, log_handle) -> None:
    """The training's output into its log file and this job's log, in a thread of its own (the main thread waits
    for the process in short slices, see wait_with_signals). A job log that can no longer be written (its reader
    gone) does not stop the copy into the log file, nor the training."""
    echo = True
    for chunk in iter(stream.readline, b""):
        try:
            log_handle.write(chunk)
            log_handle.flush()
        except ValueError:  # closed: the training ended 30 s ago and a process it left still holds the pipe
            return
        if echo:
            try:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            except (OSError, ValueError):
                echo = False


def _ignore_usr2() -> None:  # pragma: no cover - runs in the child between fork and exec
    # inherited through exec: torchrun (which installs no USR2 handler) survives the signal Slurm sends to every
    # process of the job; the workers install their own handler first thing (sftjobs.trainer.signal_save)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


LOCK_NAME = ".sftjobs-writer.lock"
REQUEUE_LOCK_WAIT_S = 180  # a requeued job may start while its dead predecessor's lock still lingers (NFS leases)


@contextlib.contextmanager
def output_dir_lock(ctx: StepContext, output_dir: Path):
    """Only one training writes into an output_dir at a time: the first node holds an flock on a file there for as
    long as it trains (released when the process ends, crash included). Another run's writer is refused at once;
    this run's own step (a requeue that started before its predecessor's lock was released) waits a while."""
    if ctx.node_rank != 0:
        yield
        return
    lock = output_dir / LOCK_NAME
    me = {"run": ctx.run_dir.name, "step": ctx.step.name, "host": socket.gethostname(), "pid": os.getpid(),
          "job_id": os.environ.get("SLURM_JOB_ID")}
    deadline = time.monotonic() + REQUEUE_LOCK_WAIT_S
    while True:
        with exclusive_lock(lock, blocking=False) as fd:
            if fd is not None:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
                yield
                return
            try:
                holder = json.loads(lock.read_text(encoding="utf-8") or "{}")
            except (OSError, ValueError):
                holder = {}
            same = holder.get("run") == me["run"] and holder.get("step") == me["step"]
            if not same or time.monotonic() > deadline:
                who = (f"run {holder.get('run', '?')} (step {holder.get('step', '?')}, host {holder.get('host', '?')}, "
                       f"pid {holder.get('pid', '?')})")
                raise SftjobsError(f"{output_dir} is being written by {who}: two trainings in one output_dir would "
                                   "clobber each other's checkpoints. Wait for it or cancel it, or set another "
                                   "output_dir.")
        ctx.log(f"{output_dir} is still locked by this step's previous attempt; waiting for it to be released")
        time.sleep(5)


def run_training_process(command: list[str], env: dict[str, str], training_log: Path, monitor: Path,
                         output_dir: Path, log, marker: Path | None) -> tuple[int, str | None]:
    """Run the training command to its end: its output into ``training_log`` and this job's log, its memory
    sampled into ``monitor``, a stop signal to this process passed on to it (SignalRelay). The exit code and the
    stop signal this process received, if any."""
    with open(training_log, "ab") as log_handle:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                   preexec_fn=_ignore_usr2)
        copier = threading.Thread(target=copy_output, args=(process.stdout, log_handle), daemon=True)
        with Sampler(monitor, process.pid, output_dir), SignalRelay(process, is_distributed(env), log,
                                                                     marker=marker) as relay:
            copier.start()
            code = wait_with_signals(process)
        copier.join(timeout=30)
    return code, relay.received


def read_stop(marker: Path, since: float) -> dict | None:
    """The stop marker of this launch (a marker from an earlier launch is removed before it starts)."""
    try:
        if marker.stat().st_mtime + 1 < since:
            return None
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run(ctx: StepContext) -> None:
    output_dir = ctx.output_dir()
    output_dir.mkdir(parents=True, exist_ok=True)
    with output_dir_lock(ctx, output_dir):
        _train(ctx, output_dir)


def _train(ctx: StepContext, output_dir: Path) -> None:
    config = ctx.training_config_path()
    resume = newest_complete_checkpoint(output_dir, log=ctx.log) if ctx.node_rank == 0 else None
    if ctx.node_rank != 0:
        # every node must pass the same resume flag: read what the checkpoints say, do not move anything
        complete = [p for _, p in checkpoints(output_dir) if is_complete_checkpoint(p)]
        resume = complete[-1] if complete else None
    log_dir = ctx.run_dir / "logs" / ctx.step.name
    log_dir.mkdir(parents=True, exist_ok=True)
    memory_log = ctx.run_dir / "monitor" / "allocator" / f"{ctx.step.name}-{socket.gethostname()}"
    marker = stop_marker_path(ctx.run_dir, ctx.step.name)
    if ctx.node_rank == 0:
        marker.unlink(missing_ok=True)
    command = training_command(config, resume, ctx.profile.get("speed"), memory_log, stop_marker=marker,
                               save_log=save_log_path(ctx.run_dir, ctx.step.name),
                               recompute_by_tokens=(ctx.memory_plan or {}).get("recompute_by_tokens"))
    training_log = log_dir / ("training.log" if ctx.node_rank == 0 else f"training.node{ctx.node_rank}.log")
    ctx.log(("resuming from " + str(resume)) if resume else f"starting {ctx.step.target} training into {output_dir}")
    ctx.log("$ " + shlex.join(command) + f"  (log: {training_log})")
    monitor = ctx.run_dir / "monitor" / f"{ctx.step.name}-{socket.gethostname()}.jsonl"
    env = launch_env(os.environ)
    started = time.time()
    code, received = run_training_process(command, env, training_log, monitor, output_dir, ctx.log, marker)
    stop = read_stop(marker, started)
    if stop is not None:
        seconds = stop.get("save_seconds")
        raise StepStopped(f"stopped on {stop.get('signal')} at step {stop.get('step')}/{stop.get('max_steps')} after "
                          f"saving {Path(str(stop.get('checkpoint'))).name}"
                          + (f" in {seconds:.1f} s" if isinstance(seconds, int | float) else "")
                          + "; a requeued or resumed job continues from it")
    if code != 0:
        if received:
            raise StepStopped(f"stopped on {received} before a checkpoint could be saved (training exited "
                              f"with {code}); a requeued or resumed job continues from the newest complete one")
        tail = training_log.read_text(errors="replace").strip().splitlines()[-5:]
        raise SftjobsError(f"LLaMA-Factory training exited with {code}. Last lines of {training_log}:\n  " + "\n  ".join(tail))
    ctx.log(f"training finished; outputs in {output_dir}")

"""The node runtime: what every job runs on its node (``python -m sftjobs.steps STEP --run-dir DIR``).

It records the step's own status under reports/status/ (so status works without sacct), and when the
step fails it cancels the steps that wait on it: real clusters often lack kill_invalid_depend, and a
broken afterok chain would otherwise sit PENDING forever.
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys
import time
import traceback
from pathlib import Path

from sftjobs import executors
from sftjobs.errors import EXIT_STOPPED, SftjobsError, StepStopped
from sftjobs.fsutil import atomic_write_json
from sftjobs.node.context import StepContext


def status_path(run_dir: Path, step: str) -> Path:
    return run_dir / "reports" / "status" / f"{step}.json"


# step kind (plan.json) -> the module whose run(ctx) does it; imported on use, so a data step never imports torch
STEP_MODULES = {
    "data": "sftjobs.steps.data",
    "model": "sftjobs.steps.model",
    "preflight": "sftjobs.steps.preflight",
    "train": "sftjobs.steps.train",
    "validate": "sftjobs.steps.validate",
}


def run_step(ctx: StepContext) -> None:
    kind = ctx.step.kind
    if kind not in STEP_MODULES:  # pragma: no cover - the planner only makes the kinds above
        raise SftjobsError(f"unknown step kind {kind!r} in {ctx.run_dir / 'plan.json'}")
    importlib.import_module(STEP_MODULES[kind]).run(ctx)
    if kind == "validate" and ctx.step.target == "dry_run":
        from sftjobs.node import timelimit

        timelimit.apply(ctx)


def break_chain(ctx: StepContext, why: str) -> list[str]:
    """Cancel every queued step downstream of this one (the manifest says which jobs those are)."""
    jobs = ctx.manifest.get("jobs", {})
    executor = ctx.manifest.get("executor")
    victims = [jobs[name] for name in ctx.plan.dependants(ctx.step.name) if name in jobs]
    if not victims or executor != "slurm":
        return []  # the local chain runner stops by itself; nothing queued elsewhere
    ctx.log(f"cancelling {len(victims)} dependent job(s) {' '.join(victims)}: {why}")
    try:
        executors.backend("slurm").cancel(ctx.run_dir, victims)
    except OSError as exc:
        ctx.log(f"could not cancel them: {exc}")
    return victims


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftjobs.steps")
    parser.add_argument("step")
    parser.add_argument("--run-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    ctx = StepContext.load(args.run_dir.absolute(), args.step)
    record = ctx.node_rank == 0  # one status file per step, from the first node
    started = time.time()
    base = {"step": ctx.step.name, "host": socket.gethostname(), "pid": os.getpid(),
            "job_id": os.environ.get("SLURM_JOB_ID"), "started": started,
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)}
    if record:
        atomic_write_json(status_path(ctx.run_dir, ctx.step.name), {**base, "state": "RUNNING"})
    code, message, state = 0, "", "COMPLETED"
    try:
        run_step(ctx)
    except StepStopped as exc:  # saved at a signal: the job is requeued or cancelled, the chain stays
        code, message, state = EXIT_STOPPED, str(exc), "STOPPED"
        ctx.log(message)
    except SftjobsError as exc:
        code, message = 2, str(exc)
    except KeyboardInterrupt:
        code, message = 130, "interrupted"
    except Exception as exc:  # a bug or an environment failure: keep the traceback in the log
        traceback.print_exc()
        code, message = 1, f"{type(exc).__name__}: {exc}"
    if code and state != "STOPPED":
        state = "FAILED"
        print(f"sftjobs: step {ctx.step.name} failed: {message}", file=sys.stderr, flush=True)
    if record:
        atomic_write_json(status_path(ctx.run_dir, ctx.step.name),
                          {**base, "state": state, "exit_code": code, "message": message, "ended": time.time()})
    if state == "FAILED" and record:
        break_chain(ctx, f"step {ctx.step.name} failed: {message.splitlines()[0] if message else code}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())

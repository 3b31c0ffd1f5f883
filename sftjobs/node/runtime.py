"""The node runtime: what every job runs on its node (``python -m sftjobs.steps STEP --run-dir DIR``).

It records the step's own status under reports/status/ (so status works without sacct), and when the
step fails it cancels the steps that wait on it: real clusters often lack kill_invalid_depend, and a
broken afterok chain would otherwise sit PENDING forever.

A job may run several steps (plan.json's ``job``): the first GPU job runs preflight, then trains, then (a dry
run) validates, in order on its own node; each step keeps its own record, so status shows each as its own row.
A step whose record says COMPLETED is not run again when the job is requeued or resumed; preflight is (it checks
the node the job landed on). On a multi-node job the first node runs the checks and the validation; the other
nodes wait for the checks' record before they join the training.
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

from sftjobs import executors
from sftjobs.errors import EXIT_STOPPED, SftjobsError, StepStopped
from sftjobs.fsutil import atomic_write_json, read_json
from sftjobs.node.context import StepContext
from sftjobs.planning.dag import Plan, Step


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
    if kind == "train" and ctx.step.preflight:
        node_checks(ctx)
    importlib.import_module(STEP_MODULES[kind]).run(ctx)
    if kind == "validate" and ctx.step.target == "dry_run":
        from sftjobs.node import timelimit

        timelimit.apply(ctx)


def node_checks(ctx: StepContext) -> None:
    """A training job without a preflight step of its own (the full run after a dry run) checks its node first:
    the same checks, reported in reports/<step>_preflight.json; a failure fails the training step before it trains.
    The other nodes of a multi-node job wait for the first node's verdict (its record <step>_preflight)."""
    name = f"{ctx.step.name}_preflight"
    if ctx.node_rank != 0:
        if wait_for_record(ctx, name) != "COMPLETED":
            raise SftjobsError(f"the pre-flight checks on the job's first node failed (reports/{name}.json)")
        return
    checks = replace(ctx, step=replace(ctx.step, name=name, kind="preflight", job=ctx.step.name, preflight=False))
    base = launch_record(checks)
    atomic_write_json(status_path(ctx.run_dir, name), {**base, "state": "RUNNING"})
    try:
        importlib.import_module(STEP_MODULES["preflight"]).run(checks)
    except BaseException as exc:
        atomic_write_json(status_path(ctx.run_dir, name),
                          {**base, "state": "FAILED", "message": str(exc), "ended": time.time()})
        if isinstance(exc, SftjobsError):
            raise SftjobsError(f"pre-flight on {socket.gethostname()}, before training: {exc}") from None
        raise
    atomic_write_json(status_path(ctx.run_dir, name), {**base, "state": "COMPLETED", "ended": time.time()})


def current_launch() -> tuple[str | None, int]:
    """This launch of the job: its Slurm job id (None outside Slurm) and restart count (a requeue adds one)."""
    return os.environ.get("SLURM_JOB_ID"), int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def is_this_launch(record: dict) -> bool:
    """Whether a step record was written in this launch of the job (never outside Slurm, where nothing tells
    launches apart)."""
    job_id, restart = current_launch()
    return job_id is not None and record.get("job_id") == job_id and record.get("restart") == restart


def launch_record(ctx: StepContext) -> dict:
    """What identifies one launch of a step: its node, process, job and the job's restart (a requeue)."""
    job_id, restart = current_launch()
    return {"step": ctx.step.name, "job": ctx.step.job or ctx.step.name, "host": socket.gethostname(), "pid": os.getpid(),
            "job_id": job_id, "started": time.time(), "restart": restart}


def wait_for_record(ctx: StepContext, name: str, poll_s: float = 2.0) -> str:
    """On a node other than the first: wait until the first node has ended step ``name`` in this launch of the job
    (the same job id and restart); its final state. Bounded by the job's time limit."""
    while True:
        try:
            record = read_json(status_path(ctx.run_dir, name))
        except (OSError, ValueError):
            record = {}
        if is_this_launch(record) and record.get("state") in ("COMPLETED", "FAILED", "CANCELLED", "STOPPED"):
            return record["state"]
        time.sleep(poll_s)


def break_chain(ctx: StepContext, why: str) -> list[str]:
    """Cancel every queued step downstream of this one (the manifest says which jobs those are); never this
    step's own job (the steps after it there do not run: the job ends FAILED by itself)."""
    jobs = ctx.manifest.get("jobs", {})
    executor = ctx.manifest.get("executor")
    own = jobs.get(ctx.step.name)
    victims = list(dict.fromkeys(jobs[name] for name in ctx.plan.dependants(ctx.step.name)
                                 if name in jobs and jobs[name] != own))
    if not victims or executor != "slurm":
        return []  # the local chain runner stops by itself; nothing queued elsewhere
    ctx.log(f"cancelling {len(victims)} dependent job(s) {' '.join(victims)}: {why}")
    try:
        executors.backend("slurm").cancel(ctx.run_dir, victims)
    except OSError as exc:
        ctx.log(f"could not cancel them: {exc}")
    return victims


def run_one(ctx: StepContext, chain: bool = True) -> tuple[int, str, str]:
    """Run one step with its own record; (exit code, message, state). ``chain``: a failure cancels the jobs that
    wait on it."""
    record = ctx.node_rank == 0  # one status file per step, from the first node
    base = launch_record(ctx)
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
    if state == "FAILED" and record and chain:
        break_chain(ctx, f"step {ctx.step.name} failed: {message.splitlines()[0] if message else code}")
    return code, message, state


def completed_earlier(run_dir: Path, step: str) -> bool:
    """Whether ``step`` completed in an earlier launch of its job. A record of this launch (the same job id and
    restart) does not count: on a second node that starts late, the first node may have finished the step already
    in this launch, and this node still has its part to run."""
    try:
        record = read_json(status_path(run_dir, step))
    except (OSError, ValueError):
        return False
    return record.get("state") == "COMPLETED" and not is_this_launch(record)


def run_job(run_dir: Path, plan: Plan, host: str) -> int:
    """The steps of one job, in order (see the module's docstring)."""
    steps: list[Step] = plan.job_steps(host)
    first = StepContext.load(run_dir, host)
    first_node = first.node_rank == 0
    done = {s.name for s in steps if s.kind != "preflight" and completed_earlier(run_dir, s.name)}
    if first_node:  # this launch's queue inside the job: stale records of an earlier launch say PENDING now
        base = {**launch_record(first), "state": "PENDING", "reason": "InJob"}
        for step in steps:
            if step.name not in done:
                atomic_write_json(status_path(run_dir, step.name), {**base, "step": step.name})
    for index, step in enumerate(steps):
        if step.name in done:
            first.log(f"step {step.name} completed in an earlier launch of this job; not run again")
            continue
        ctx = StepContext.load(run_dir, step.name)
        if not first_node and step.kind != "train":
            # checks and validation run on the first node; this node joins the training once the checks passed
            if step.kind == "preflight" and wait_for_record(ctx, step.name) != "COMPLETED":
                ctx.log("the pre-flight checks on the job's first node did not pass; this node stops")
                return 2
            continue
        code, message, state = run_one(ctx, chain=False)
        if code:
            rest = [s.name for s in steps[index + 1:] if s.name not in done]
            if first_node and state == "FAILED":
                why = f"{step.name} failed in this job: {(message.splitlines() or [''])[0]}"
                for name in rest:
                    atomic_write_json(status_path(run_dir, name),
                                      {**launch_record(ctx), "step": name, "state": "CANCELLED", "message": why,
                                       "ended": time.time()})
                break_chain(ctx, f"step {step.name} failed: {message.splitlines()[0] if message else code}")
            return code
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftjobs.steps")
    parser.add_argument("step", help="a job's first step runs the whole job (plan.json's job); another step runs alone")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--only", action="store_true", help="run just this step, not the rest of its job (by hand)")
    args = parser.parse_args(argv)
    run_dir = args.run_dir.absolute()
    plan = Plan.from_dict(read_json(run_dir / "plan.json"))
    if not args.only and plan.step(args.step).job is None and plan.shares_job(args.step):
        return run_job(run_dir, plan, args.step)
    return run_one(StepContext.load(run_dir, args.step))[0]


if __name__ == "__main__":
    raise SystemExit(main())

"""The node runtime with stand-in steps (run by tests/slurm/fake_step_python.sh as ``fake_steps.py -m sftjobs.steps
JOB --run-dir DIR``): sftjobs.node.runtime runs the job as it would on a node - each of its steps in order, with
its own record - but each step only records its environment, sleeps FAKE_SLEEP seconds (FAKE_SLEEP_<STEP> for one
step) and fails when named by FAKE_FAIL_STEP."""

from __future__ import annotations

import os
import socket
import sys
import time

ENV_PREFIXES = ("SLURM_", "NODE_RANK", "NNODES", "NPROC_PER_NODE", "MASTER_", "CUDA_VISIBLE", "FORCE_TORCHRUN", "HF_")


def run(ctx) -> None:
    from sftjobs.errors import SftjobsError

    node = os.environ.get("SLURM_NODEID", "0")
    env = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith(ENV_PREFIXES))
    (ctx.run_dir / "fake").mkdir(exist_ok=True)
    (ctx.run_dir / "fake" / f"{ctx.step.name}.{node}.env").write_text("\n".join(env) + "\n")
    with open(ctx.run_dir / "fake" / "runs.log", "a") as runs:  # every launch of every step, in order
        runs.write(f"{ctx.step.name} node {node} job {os.environ.get('SLURM_JOB_ID', '-')} "
                   f"restart {os.environ.get('SLURM_RESTART_COUNT', '0')}\n")
    time.sleep(float(os.environ.get(f"FAKE_SLEEP_{ctx.step.name.upper()}") or os.environ.get("FAKE_SLEEP") or 0))
    if os.environ.get("FAKE_FAIL_STEP") == ctx.step.name:
        raise SftjobsError(f"fake failure in {ctx.step.name}")
    print(f"fake step {ctx.step.name} done on {socket.gethostname()} node {node}", flush=True)


def main(argv: list[str]) -> int:
    from sftjobs.node import runtime

    if argv[:2] != ["-m", "sftjobs.steps"]:
        raise SystemExit(f"usage: fake_steps.py -m sftjobs.steps JOB --run-dir DIR (got {argv})")
    runtime.STEP_MODULES = {kind: "fake_steps" for kind in runtime.STEP_MODULES}
    return runtime.main(argv[2:])


if __name__ == "__main__":
    sys.modules.setdefault("fake_steps", sys.modules["__main__"])
    raise SystemExit(main(sys.argv[1:]))

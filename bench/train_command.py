"""The shell script that runs a rendered run directory's training as the train step does, with the step timer:

    python3 bench/train_command.py RENDER_DIR NPROC PORT > command.sh && bash command.sh

It holds the profile's launcher.setup lines (what the run's step script runs first), llamafactory-cli's torchrun
environment (sftjobs.steps.train.launch_env) and the train step's own command (sftjobs.steps.train.training_command:
torchrun, `-m sftjobs.trainer.entry`, the speed.* switches of the rendered profile, llamafactory/train.yaml) with
`--callback bench.step_timer:callbacks` added. The train step's --memory-log (it resets the peak-memory counter the
timer reads), --stop-marker and --save-log are left out: they serve a long run, not a timed one.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import yaml

from sftjobs.steps.train import launch_env, training_command

TIMER = "bench.step_timer:callbacks"


def script(run_dir: Path, nproc: int, port: int, python: str = "python3") -> str:
    profile = (yaml.safe_load((run_dir / "profile.yaml").read_text(encoding="utf-8")) or {}).get("values") or {}
    env = {"FORCE_TORCHRUN": "1", "NNODES": "1", "NODE_RANK": "0", "NPROC_PER_NODE": str(nproc),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    memory_plan = json.loads((run_dir / "plan.json").read_text(encoding="utf-8")).get("memory_plan") or {}
    command = training_command(run_dir / "llamafactory" / "train.yaml", None, profile.get("speed") or {},
                               env=env, python=python, callbacks=(TIMER,),
                               recompute_by_tokens=memory_plan.get("recompute_by_tokens"))
    defaults = {k: v for k, v in launch_env({}).items() if k not in os.environ}
    lines = ["set -e", "# launcher.setup of the rendered profile", *(profile.get("launcher") or {}).get("setup", []),
             "# llamafactory-cli's torchrun defaults (sftjobs.steps.train.launch_env)",
             *(f"export {k}={shlex.quote(v)}" for k, v in defaults.items()),
             "exec " + shlex.join(command)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(script(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))

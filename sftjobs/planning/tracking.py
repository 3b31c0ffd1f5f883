"""Experiment tracking (profile key ``tracking``): where a run's TensorBoard logs go and which W&B run each
training step continues.

A run's tracking is fixed when its directory is rendered and recorded in plan.json, so every launch of a
training step from that directory (a requeue, ``sftjobs resume``, a restart by hand) logs to the same place:
TensorBoard into ``<run dir>/tensorboard/<step>/`` (step numbers are the trainer's global steps, so a resumed
step continues the same curve), W&B into one run per training step whose id is derived from the run id, with
resume allowed. W&B's mode (online, offline, disabled), project, entity and key come from the environment the
job runs in (WANDB_MODE, WANDB_PROJECT, WANDB_API_KEY, ...): sftjobs never writes them into a file.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

TRACKING_CHOICES = ("none", "tensorboard", "wandb")
# W&B run ids: letters, digits, "-", "_" and "." are safe everywhere (a run id names a directory and a URL path).
_WANDB_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
WANDB_ID_MAX = 64


def wandb_run_id(run_id: str, step: str) -> str:
    """The W&B run id of one training step of a run: the same for every launch of that step."""
    text = _WANDB_ID_UNSAFE.sub("_", f"{run_id}-{step}")
    if len(text) <= WANDB_ID_MAX:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{text[:WANDB_ID_MAX - len(digest) - 1]}-{digest}"


def tracking_record(kind: str, run_dir: str, run_id: str, train_steps: list[str]) -> dict[str, Any] | None:
    """plan.json's ``tracking``: what each training step logs to (None when the profile tracks nothing)."""
    if kind == "none":
        return None
    record: dict[str, Any] = {"kind": kind}
    if kind == "tensorboard":
        record["tensorboard_dir"] = os.path.join(run_dir, "tensorboard")
        record["logdirs"] = {step: os.path.join(run_dir, "tensorboard", step) for step in train_steps}
    else:
        record["wandb_dir"] = run_dir  # unless the job's environment sets WANDB_DIR
        record["run_ids"] = {step: wandb_run_id(run_id, step) for step in train_steps}
    return record


def step_tracking(record: dict[str, Any] | None, step: str) -> dict[str, Any]:
    """What the launch script of one step exports (step.sh.j2): nothing for a step that does not train."""
    if record is None:
        return {"kind": "none"}
    if record["kind"] == "tensorboard":
        return {"kind": "tensorboard", "logdir": record["logdirs"][step]} if step in record["logdirs"] else {"kind": "none"}
    if step in record["run_ids"]:
        return {"kind": "wandb", "run_id": record["run_ids"][step], "wandb_dir": record["wandb_dir"]}
    return {"kind": "none"}

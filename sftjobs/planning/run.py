"""Profile + plan -> the planned run: its paths and its memory plan, everything render needs to write text.

The memory plan's one outside input is the model's config.json when it is already in the model folder (else
sftjobs' table of known shapes); that is read here, during planning, so render stays text only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftjobs.planning.dag import Plan
from sftjobs.planning.memory import apply_plan, plan_memory
from sftjobs.planning.paths import RunPaths
from sftjobs.profile import Profile


@dataclass(frozen=True)
class PlannedRun:
    profile: Profile            # as the user wrote it (profile.yaml, config_hash)
    effective: Profile          # what the files are rendered from: the memory plan's stage, batch and recompute
    plan: Plan
    paths: RunPaths
    run_id: str
    memory: dict[str, Any] | None  # the memory plan (plan.json, manifest), None when the profile asks for none


def plan_run(profile: Profile, plan: Plan, run_dir: Path, run_id: str, base: Path) -> PlannedRun:
    """base: what relative profile paths resolve against (the run store, sftjobs.runs.store_dir())."""
    paths = RunPaths(profile, run_dir, base, run_id)
    memory = plan_memory(profile, paths.model_dir)
    return PlannedRun(profile, apply_plan(profile, memory), plan, paths, run_id, memory)

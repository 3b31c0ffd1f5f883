"""What a step knows on the node: everything comes from the run directory (plan.json, profile.yaml,
manifest.json), nothing from the login node's memory."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sftjobs.fsutil import atomic_write_json
from sftjobs.planning.dag import Plan, Step


@dataclass
class StepContext:
    run_dir: Path
    step: Step
    plan: Plan
    paths: dict[str, Any]          # plan.json "paths": model_dir, data_dir, output_dir, dataset_dir, ...
    profile: dict[str, Any]        # the resolved profile values (profile.yaml "values")
    config_hash: str
    manifest: dict[str, Any] = field(default_factory=dict)  # empty when rendered but not submitted
    memory_plan: dict[str, Any] | None = None  # plan.json "memory_plan" (deepspeed: auto / batch.global_size)

    @classmethod
    def load(cls, run_dir: Path, step_name: str) -> "StepContext":
        plan_data = json.loads((run_dir / "plan.json").read_text())
        plan = Plan.from_dict(plan_data)
        profile = yaml.safe_load((run_dir / "profile.yaml").read_text())
        manifest_path = run_dir / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        return cls(run_dir=run_dir, step=plan.step(step_name), plan=plan, paths=plan_data["paths"],
                   profile=profile["values"], config_hash=profile["config_hash"], manifest=manifest,
                   memory_plan=plan_data.get("memory_plan"))

    # ---- where a step keeps its outputs inside the run directory
    @property
    def reports_dir(self) -> Path:
        return self.run_dir / "reports"

    def report_path(self, name: str | None = None) -> Path:
        return self.reports_dir / f"{name or self.step.name}.json"

    def write_report(self, data: dict[str, Any], name: str | None = None) -> Path:
        return atomic_write_json(self.report_path(name), data)

    def training_config_path(self, target: str | None = None) -> Path:
        target = target or self.step.target or "full"
        return self.run_dir / "llamafactory" / ("dry_run.yaml" if target == "dry_run" else "train.yaml")

    def training_config(self, target: str | None = None) -> dict[str, Any]:
        return yaml.safe_load(self.training_config_path(target).read_text())

    def output_dir(self, target: str | None = None) -> Path:
        return Path(self.training_config(target)["output_dir"])

    def log(self, message: str) -> None:
        print(f"[sftjobs {self.step.name} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    @property
    def node_rank(self) -> int:
        return int(os.environ.get("SLURM_NODEID", os.environ.get("NODE_RANK", "0")) or 0)

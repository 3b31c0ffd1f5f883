"""After a successful dry run: the full run's --time from the dry run's measured speed, when the profile
sets none (resources.time: null). Slurm lets a user lower a pending job's limit, never raise it, so the
full run is queued without --time (the partition's default) and lowered here to estimate x margin."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

from sftjobs.node.context import StepContext
from sftjobs.steps.preflight import _dataset_rows, training_steps
from sftjobs.steps.validate import read_trainer_log

MARGIN = 1.5           # the full run's steps are longer on average than a 63-step sample suggests
FIXED_MINUTES = 30     # start-up, loading the tokenized data, checkpoint saves


def seconds_per_step(output_dir: Path) -> float | None:
    """The dry run's seconds per optimizer step: the Trainer's own train_runtime / steps (sub-second
    precision, warm-up included, so on the safe side), else the trainer_log's elapsed times."""
    try:
        results = json.loads((output_dir / "train_results.json").read_text())
        state = json.loads((output_dir / "trainer_state.json").read_text())
        if results.get("train_runtime") and state.get("global_step"):
            return float(results["train_runtime"]) / int(state["global_step"])
    except (OSError, ValueError):
        pass
    points = [e for e in read_trainer_log(output_dir / "trainer_log.jsonl") if "current_steps" in e and e.get("elapsed_time")]
    if len(points) < 2:
        return None
    first, last = points[0], points[-1]
    steps = last["current_steps"] - first["current_steps"]
    seconds = _hms(last["elapsed_time"]) - _hms(first["elapsed_time"])
    return seconds / steps if steps > 0 and seconds > 0 else None


def _hms(text: str) -> float:
    days = 0
    if "day" in text:  # "1 day, 2:03:04"
        head, _, text = text.partition(", ")
        days = int(head.split()[0])
    parts = [float(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    return days * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def estimate(ctx: StepContext) -> dict[str, Any] | None:
    per_step = seconds_per_step(ctx.output_dir("dry_run"))
    if per_step is None:
        return None
    full = ctx.training_config("full")
    train = next(s for s in ctx.plan.steps if s.kind == "train" and s.target == "full")
    world = train.resources.nodes * max(train.resources.gpus_per_node, 1)
    dataset = full["dataset"]
    info_file = Path(ctx.paths["data_dir"]) / f"{dataset}.jsonl"
    rows = _dataset_rows(ctx, dataset, info_file)
    samples = min(rows, full.get("max_samples") or rows)
    steps = training_steps(samples, world, full.get("per_device_train_batch_size", 1),
                           full.get("gradient_accumulation_steps", 1), full.get("num_train_epochs", 3.0),
                           full.get("max_steps"))
    minutes = math.ceil(steps * per_step * MARGIN / 60) + FIXED_MINUTES
    return {"seconds_per_step": round(per_step, 3), "full_run_steps": steps, "samples": samples,
            "margin": MARGIN, "fixed_minutes": FIXED_MINUTES, "time_limit_minutes": minutes}


def apply(ctx: StepContext) -> dict[str, Any] | None:
    """Lower the queued full run's time limit to the estimate (Slurm runs with resources.time: null only)."""
    if ctx.profile["resources"]["time"] is not None:
        return None
    result = estimate(ctx)
    if result is None:
        why = "the dry run left no timing (train_results.json, trainer_log.jsonl); the full run keeps its limit"
        ctx.log(why)
        ctx.write_report({"applied_to": None, "why": why}, name="time_limit")
        return None
    job_id = ctx.manifest.get("jobs", {}).get("train")
    if ctx.manifest.get("executor") == "slurm" and job_id:
        done = subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={result['time_limit_minutes']}"],
                              capture_output=True, text=True, timeout=60)
        result["applied_to"] = job_id
        result["scontrol"] = (done.stdout + done.stderr).strip() or "ok"
        ctx.log(f"full run {job_id}: time limit set to {result['time_limit_minutes']} min "
                f"({result['full_run_steps']} steps x {result['seconds_per_step']} s x {MARGIN} + {FIXED_MINUTES} min)")
    ctx.write_report(result, name="time_limit")
    return result

"""After a successful dry run: the full run's --time from the dry run's measured speed, when the profile
sets none (resources.time: null). Slurm lets a user lower a pending job's limit, never raise it, so the
full run is queued without --time (the partition's default) and lowered here to estimate x margin.

It also checks the signal's lead time against what the dry run measured: at USR2 the full run finishes the
optimizer step it is on and saves (sftjobs.trainer.signal_save), and submitit requeues it only after that, so
resources.signal_delay_s must cover one step + one save (the dry run saved one full checkpoint, of the same model and
optimizer) + the requeue + Slurm's late signal (its timer runs about every 30-60 s). A lead time too short is
reported here, before the full run starts (reports/time_limit.json, ``signal``)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

from sftjobs.io.trainer_log import read_trainer_log
from sftjobs.node.context import StepContext
from sftjobs.planning.batch import optimizer_steps, world_size
from sftjobs.steps.train import save_log_path

MARGIN = 1.5           # the full run's steps are longer on average than a 63-step sample suggests
FIXED_MINUTES = 30     # start-up, loading the tokenized data, checkpoint saves
SAVE_FACTOR = 1.5      # a save on a busy shared filesystem takes longer than the dry run's one
SIGNAL_LATENESS_S = 60 # slurmctld sends --signal from a periodic timer: up to about a minute late
REQUEUE_S = 15         # submitit's scontrol requeue and exit after the save (executors/slurm_job.REQUEUE_MARGIN_S)


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
    world = world_size(vars(train.resources))
    dataset = full["dataset"]
    info_file = Path(ctx.paths["data_dir"]) / f"{dataset}.jsonl"
    rows = ctx.dataset_rows(dataset, info_file)
    samples = min(rows, full.get("max_samples") or rows)
    steps = optimizer_steps(samples, world, full.get("per_device_train_batch_size", 1),
                           full.get("gradient_accumulation_steps", 1), full.get("num_train_epochs", 3.0),
                           full.get("max_steps"))
    minutes = math.ceil(steps * per_step * MARGIN / 60) + FIXED_MINUTES
    return {"seconds_per_step": round(per_step, 3), "full_run_steps": steps, "samples": samples,
            "margin": MARGIN, "fixed_minutes": FIXED_MINUTES, "time_limit_minutes": minutes}


def signal_window(ctx: StepContext) -> dict[str, Any] | None:
    """The dry run's measured save and step time against resources.signal_delay_s (None: nothing measured)."""
    log = save_log_path(ctx.run_dir, "dry_run")
    saves = [e for e in read_trainer_log(log) if e.get("seconds") is not None] if log.is_file() else []
    if not saves:
        return None
    save = max(float(e["seconds"]) for e in saves)
    per_step = seconds_per_step(ctx.output_dir("dry_run")) or 0.0
    needed = math.ceil(per_step + SAVE_FACTOR * save + REQUEUE_S + SIGNAL_LATENESS_S)
    delay = int(ctx.profile["resources"]["signal_delay_s"])
    result = {"save_seconds": round(save, 2), "seconds_per_step": round(per_step, 3), "needed_s": needed,
              "signal_delay_s": delay, "ok": delay >= needed}
    line = (f"a checkpoint save took {save:.1f} s and a step {per_step:.1f} s in the dry run: "
            f"resources.signal_delay_s needs >= {needed} s ({per_step:.1f} + {SAVE_FACTOR} x {save:.1f} + "
            f"{REQUEUE_S} requeue + {SIGNAL_LATENESS_S} signal lateness); it is {delay}")
    ctx.log(line + ("" if delay >= needed else ": a time limit would cut the save short and lose the work since "
                    "the last complete checkpoint; raise resources.signal_delay_s for the next run"))
    return result


def apply(ctx: StepContext) -> dict[str, Any] | None:
    """Check the signal's lead time against the dry run's save; lower the queued full run's time limit to the
    estimate (Slurm runs with resources.time: null only). Writes reports/time_limit.json."""
    window = signal_window(ctx)
    if ctx.profile["resources"]["time"] is not None:
        if window is not None:
            ctx.write_report({"applied_to": None, "why": "resources.time is set", "signal": window},
                             name="time_limit")
        return None
    result = estimate(ctx)
    if result is None:
        why = "the dry run left no timing (train_results.json, trainer_log.jsonl); the full run keeps its limit"
        ctx.log(why)
        ctx.write_report({"applied_to": None, "why": why, "signal": window}, name="time_limit")
        return None
    job_id = ctx.manifest.get("jobs", {}).get("train")
    if ctx.manifest.get("executor") == "slurm" and job_id:
        done = subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={result['time_limit_minutes']}"],
                              capture_output=True, text=True, timeout=60)
        result["applied_to"] = job_id
        result["scontrol"] = (done.stdout + done.stderr).strip() or "ok"
        ctx.log(f"full run {job_id}: time limit set to {result['time_limit_minutes']} min "
                f"({result['full_run_steps']} steps x {result['seconds_per_step']} s x {MARGIN} + {FIXED_MINUTES} min)")
    result["signal"] = window
    ctx.write_report(result, name="time_limit")
    return result

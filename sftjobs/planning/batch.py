"""How a profile's batch splits over the GPUs: world size, gradient accumulation, optimizer steps.

The one place that knows these numbers; the profile's checks, the memory plan, render, preflight and the dry
run's time limit all ask here.
"""

from __future__ import annotations

import math
from typing import Any

from sftjobs.errors import SftjobsError

HF_DEFAULT_BATCH = 8  # transformers' per_device_train_batch_size when the profile sets none


def world_size(resources: dict[str, Any]) -> int:
    """Training processes: nodes x GPUs per node (one process for a CPU run)."""
    return resources["nodes"] * max(resources["gpus_per_node"], 1)


def global_size_problem(values: dict[str, Any]) -> str | None:
    """Why batch.global_size cannot be split over the GPUs at the profile's batch size, or None."""
    size = values["batch"]["global_size"]
    if size is None:
        return None
    world = world_size(values["resources"])
    bs = values["train"].get("per_device_train_batch_size", HF_DEFAULT_BATCH)
    step = world * bs
    if size % step == 0:
        return None
    lower, upper = (size // step) * step, (size // step + 1) * step
    nearest = (f"{lower} (ga {lower // step}) or {upper} (ga {upper // step})" if lower else f"{upper} (ga 1)")
    return (f"batch.global_size {size} does not split over {world} GPU(s) x per_device_train_batch_size {bs} = "
            f"{step} samples per micro-step: use batch.global_size {nearest}, or a GPU count / batch size that "
            f"divides {size}")


def gradient_accumulation(values: dict[str, Any]) -> int:
    size = values["batch"]["global_size"]
    if size is None:
        return values["train"].get("gradient_accumulation_steps", 1)
    if problem := global_size_problem(values):
        raise SftjobsError(problem)
    return size // (world_size(values["resources"]) * values["train"].get("per_device_train_batch_size", HF_DEFAULT_BATCH))


def optimizer_steps(n_samples: int, world_size: int, per_device: int, grad_accum: int, epochs: float,
                    max_steps: int | None = None) -> int:
    """Optimizer steps of a run, as HF's Trainer counts them (max_steps wins when > 0)."""
    if max_steps and max_steps > 0:
        return int(max_steps)
    batches = math.ceil(max(n_samples, 1) / max(world_size * per_device, 1))
    per_epoch = max(math.ceil(batches / max(grad_accum, 1)), 1)
    return max(math.ceil(per_epoch * epochs), 1)


def dry_run_steps(profile: Any) -> int:
    """Optimizer steps that show the dry run dry_run.max_samples samples (never more than the full run has)."""
    train = profile.train
    per_step = world_size(profile.values["resources"]) * train.get("per_device_train_batch_size", 1) * train.get("gradient_accumulation_steps", 1)
    samples = min(profile.values["dry_run"]["max_samples"], train.get("max_samples") or 10**12)
    return max(1, -(-samples // per_step))

"""Planned run -> the files of a run directory. Pure text first (``render_files``), then one atomic write each.

``sftjobs render`` and ``sftjobs submit`` both go through ``render_files``, so what a preview shows is what
the nodes run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from sftjobs.datasets import dataset_info
from sftjobs.errors import SftjobsError
from sftjobs.fsutil import atomic_write_text
from sftjobs.planning.batch import dry_run_steps
from sftjobs.planning.paths import RunPaths
from sftjobs.planning.run import PlannedRun
from sftjobs.planning.tracking import step_tracking, tracking_record
from sftjobs.profile import Profile
from sftjobs.templating import render_template

DEEPSPEED_STAGES = {"z0": (0, False), "z1": (1, False), "z2": (2, False), "z2_offload": (2, True), "z3": (3, False),
                    "z3_offload": (3, True)}
EXECUTABLE = 0o755
REGULAR = 0o644


def training_config(profile: Profile, paths: RunPaths, target: str, run_id: str | None = None) -> dict[str, Any]:
    """The LLaMA-Factory keys of the full run or the dry run, in render order.

    report_to follows the profile's ``tracking``; with tracking on, the run is named after the run id (the
    profile's train.run_name wins) so TensorBoard and W&B show which run and which step it is.

    Both tokenize into the run's tokenized_path: the dry run tokenizes the full data set once (so a bad
    row or a slow tokenizer shows up before the long run) and trains dry_run.max_samples samples by
    max_steps; the full run and any restart then load the saved tokens instead of tokenizing again.
    """
    train = dict(profile.train)
    train.setdefault("tokenized_path", paths.tokenized_path)
    output_dir = paths.output_dir
    if target == "dry_run":
        steps = dry_run_steps(profile)
        train["max_steps"] = steps
        train["save_steps"] = steps  # one checkpoint, so the dry run proves saving and loading work
        train["logging_steps"] = min(train.get("logging_steps", 10), max(1, steps // 10))
        output_dir = paths.dry_run_output_dir
    tracking = profile.spec.tracking
    train["report_to"] = tracking
    if tracking != "none" and run_id is not None:
        train.setdefault("run_name", run_id if target == "full" else f"{run_id}-dry-run")
    return {
        "model_dir": paths.model_dir,
        "train": train,
        "dataset_dir": paths.dataset_dir,
        "dataset": profile.values["data"]["dataset"],
        "output_dir": output_dir,
        "deepspeed_config": paths.deepspeed_config,
    }


def _check_training_yaml(name: str, text: str, config: dict[str, Any]) -> None:
    """The rendered YAML must read back as exactly the keys and values meant, whatever the profile's text held
    (a newline, "#", ": ", Jinja or YAML syntax): nothing from a value may become a key of its own."""
    expected = {"model_name_or_path": config["model_dir"], **config["train"], "dataset_dir": config["dataset_dir"],
                "dataset": config["dataset"], "output_dir": config["output_dir"], "overwrite_output_dir": False}
    if config["deepspeed_config"]:
        expected["deepspeed"] = config["deepspeed_config"]
    if yaml.safe_load(text) != expected:
        raise SftjobsError(f"rendering {name}: the YAML does not read back as the profile's values; this is a bug in "
                           "templates/llamafactory.yaml.j2 or sftjobs' renderer, please report it with the profile")


def render_files(run: PlannedRun) -> dict[str, str]:
    """Every file of the run directory as text, keyed by path relative to the run directory.

    ``run`` is the planned run (sftjobs.planning.run): with deepspeed: auto or batch.global_size its memory plan
    has already decided the stage, gradient accumulation and recompute (``run.effective``); profile.yaml keeps
    the profile as written (``run.profile``).
    """
    profile, plan, paths, memory, run_id = run.profile, run.plan, run.paths, run.memory, run.run_id
    effective = run.effective
    typed = effective.spec
    files: dict[str, str] = {}
    for target, name in (("full", "llamafactory/train.yaml"), ("dry_run", "llamafactory/dry_run.yaml")):
        config = training_config(effective, paths, target, run_id)
        text = render_template("llamafactory.yaml.j2", profile_name=profile.name, target=target, **config)
        _check_training_yaml(name, text, config)
        files[name] = text
    if typed.deepspeed != "none":
        stage, offload = DEEPSPEED_STAGES[typed.deepspeed]
        text = render_template("deepspeed.json.j2", stage=stage, offload=offload,
                               gradients_in_place=typed.speed.zero1_gradients_in_place)
        json.loads(text)
        files["deepspeed.json"] = text
    files["dataset/dataset_info.json"] = dataset_info(typed.data.shape, paths.data_dir)
    force_torchrun = typed.deepspeed != "none" or typed.resources.world_size > 1
    python = typed.launcher.python or sys.executable
    tracking = tracking_record(typed.tracking, paths.run_dir, run_id, [s.name for s in plan.steps if s.kind == "train"])
    for host in plan.job_hosts():  # one launch script per job; the steps inside a job share it
        step = plan.step(host)
        job_steps = [s.name for s in plan.job_steps(host)]
        files[step.script] = render_template(
            "step.sh.j2", step=step, job_steps=job_steps, run_id=run_id, run_dir=paths.run_dir, setup=list(typed.launcher.setup),
            python=python, datasets_cache=paths.datasets_cache, force_torchrun=force_torchrun,
            master_port_base=typed.launcher.master_port_base, tracking=step_tracking(tracking, step.name))
    files["profile.yaml"] = yaml.safe_dump(
        {"name": profile.name, "source": profile.source, "chain": profile.chain, "overrides": profile.overrides,
         "config_hash": profile.config_hash(), "values": profile.values}, sort_keys=False)
    record = {"run_id": run_id, "config_hash": profile.config_hash(), "paths": paths.to_dict(), **plan.to_dict()}
    if memory is not None:
        record["memory_plan"] = memory
    if tracking is not None:
        record["tracking"] = tracking
    files["plan.json"] = json.dumps(record, indent=2) + "\n"
    return files


def memory_plan_of(files: dict[str, str]) -> dict[str, Any] | None:
    """The memory plan a rendered run carries in plan.json, if any."""
    return json.loads(files["plan.json"]).get("memory_plan")


def write_run_dir(files: dict[str, str], run_dir: Path) -> list[Path]:
    """Write every file atomically; scripts executable, nothing world-writable."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(run_dir, 0o755)
    except OSError as exc:
        raise SftjobsError(f"cannot create the run directory {run_dir}: {exc.strerror}. Choose another --out or jobs dir.") from None
    written = []
    for rel, text in sorted(files.items()):
        mode = EXECUTABLE if rel.endswith(".sh") else REGULAR
        try:
            written.append(atomic_write_text(run_dir / rel, text, mode=mode))
        except OSError as exc:
            raise SftjobsError(f"cannot write {run_dir / rel}: {exc.strerror}.") from None
    return written

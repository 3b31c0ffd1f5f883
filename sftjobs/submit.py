"""Profile -> plan -> rendered run directory -> the chosen executor; the manifest records what was sent."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from sftjobs import __version__
from sftjobs.errors import SftjobsError
from sftjobs.executors.base import Executor
from sftjobs.plan import Plan, build_plan
from sftjobs.profile import Profile, load_profile
from sftjobs.render import render_files, write_run_dir
from sftjobs.runs import new_run_id, read_manifest, write_manifest
from sftjobs.runs import run_dir as run_dir_for

KEY_PACKAGES = ("torch", "transformers", "deepspeed", "llamafactory", "accelerate", "submitit")


def choose_executor(requested: str) -> tuple[str, str]:
    """The executor name and why it was chosen."""
    if requested != "auto":
        return requested, f"asked for {requested}"
    if shutil.which("sbatch"):
        return "slurm", f"sbatch found at {shutil.which('sbatch')}"
    return "local", "no sbatch on PATH, so the chain runs on this machine"


def make_executor(name: str, profile: Profile) -> Executor:
    if name == "slurm":
        from sftjobs.executors.slurm import SlurmExecutor

        return SlurmExecutor()
    from sftjobs.executors.local import DebugExecutor, LocalExecutor

    if profile.values["resources"]["nodes"] > 1:
        raise SftjobsError(f"the {name} executor runs on this machine only, but resources.nodes is "
                           f"{profile.values['resources']['nodes']}. Use --executor slurm or --set resources.nodes=1.")
    return DebugExecutor() if name == "debug" else LocalExecutor()


def executor_for_manifest(manifest: dict) -> Executor:
    if manifest["executor"] == "slurm":
        from sftjobs.executors.slurm import SlurmExecutor

        return SlurmExecutor(need_sbatch=False)  # tracking needs only squeue / sacct / scancel
    from sftjobs.executors.local import DebugExecutor, LocalExecutor

    return DebugExecutor() if manifest["executor"] == "debug" else LocalExecutor()


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def project_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5)
    except OSError:
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@dataclass
class Prepared:
    profile: Profile
    plan: Plan
    run_id: str
    run_dir: Path
    files: dict[str, str]
    executor: Executor
    executor_name: str
    why: str


def prepare(profile_ref: str, overrides: list[str], dry_run_first: bool, executor: str | None) -> Prepared:
    profile = load_profile(profile_ref, overrides)
    name, why = choose_executor(executor or profile.values["resources"]["executor"])
    backend = make_executor(name, profile)
    plan = build_plan(profile, dry_run_first=dry_run_first)
    run_id = new_run_id(profile.name)
    run_dir = run_dir_for(run_id)
    return Prepared(profile, plan, run_id, run_dir, render_files(profile, plan, run_dir, run_id), backend, name, why)


def preview(p: Prepared) -> str:
    lines = [f"# run {p.run_id} (not submitted): executor {p.executor_name} ({p.why})",
             f"# run directory would be {p.run_dir}"]
    return "\n".join(lines) + "\n" + p.executor.preview(p.plan, p.run_dir)


def submit(p: Prepared) -> dict:
    write_run_dir(p.files, p.run_dir)
    manifest = {
        "run_id": p.run_id, "profile": p.profile.name, "profile_source": p.profile.source,
        "overrides": p.profile.overrides, "config_hash": p.profile.config_hash(), "config": p.profile.values,
        "executor": p.executor_name, "executor_reason": p.why, "dry_run_first": p.plan.dry_run_first,
        "submitted": time.time(), "sftjobs_version": __version__, "commit": project_commit(),
        "versions": package_versions(), "files": sorted(p.files), "jobs": {}, "state": "submitting",
        "history": [],
    }
    write_manifest(p.run_dir, manifest)
    try:
        manifest["jobs"] = p.executor.submit(p.plan, p.run_dir)
    except SftjobsError as exc:
        manifest.update(state="submit_failed", error=str(exc))
        write_manifest(p.run_dir, manifest)
        raise
    manifest["state"] = "submitted"
    write_manifest(p.run_dir, manifest)
    return manifest


def record_event(run_dir: Path, event: str, **fields) -> None:
    manifest = read_manifest(run_dir)
    manifest.setdefault("history", []).append({"time": time.time(), "event": event, **fields})
    write_manifest(run_dir, manifest)

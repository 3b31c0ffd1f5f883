"""Profile -> plan -> rendered run directory -> the chosen executor; the manifest records what was sent."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sftjobs import __version__, executors
from sftjobs.env import library_versions
from sftjobs.errors import SftjobsError
from sftjobs.executors.base import Executor
from sftjobs.fsutil import exclusive_lock
from sftjobs.planning.dag import Plan, build_plan
from sftjobs.planning.memory import summary_line
from sftjobs.planning.run import plan_run
from sftjobs.preflight_checks import check_before_queueing
from sftjobs.profile import Profile, load_profile
from sftjobs.render import memory_plan_of, render_files, write_run_dir
from sftjobs.runs import new_run_id, read_manifest, store_dir, write_manifest
from sftjobs.runs import run_dir as run_dir_for


def make_executor(name: str, profile: Profile) -> Executor:
    if name in executors.ON_THIS_MACHINE and profile.values["resources"]["nodes"] > 1:
        raise SftjobsError(f"the {name} executor runs on this machine only, but resources.nodes is "
                           f"{profile.values['resources']['nodes']}. Use --executor slurm or --set resources.nodes=1.")
    return executors.backend(name, submitting=True)


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
    refused: str | None = None  # set by preview(): what submit would refuse


def prepare(profile_ref: str, overrides: list[str], dry_run_first: bool, executor: str | None) -> Prepared:
    profile = load_profile(profile_ref, overrides)
    check_before_queueing(profile, store_dir())
    name, why = executors.choose(executor or profile.values["resources"]["executor"])
    backend = make_executor(name, profile)
    plan = build_plan(profile, dry_run_first=dry_run_first)
    run_id = new_run_id(profile.name)
    run_dir = run_dir_for(run_id)
    backend.check_run_dir(run_dir)
    return Prepared(profile, plan, run_id, run_dir, render_files(plan_run(profile, plan, run_dir, run_id, base=store_dir())), backend, name, why)


def preview(p: Prepared) -> str:
    lines = [f"# run {p.run_id} (not submitted): executor {p.executor_name} ({p.why})",
             f"# run directory would be {p.run_dir}"]
    memory = memory_plan_of(p.files)
    if memory is not None:
        lines.append(f"# {summary_line(memory)}")
    try:
        checked = p.executor.check(p.plan)
    except SftjobsError as exc:
        p.refused = str(exc)
        checked = f"submit would refuse this run: {exc}"
    if checked:
        lines.append(f"# cluster check: {checked}")
    return "\n".join(lines) + "\n" + p.executor.preview(p.plan, p.run_dir)


def live_runs_using(output_dir: str) -> list[str]:
    """Other runs whose live steps write into this output_dir (two trainers there would clobber checkpoints)."""
    from sftjobs.runs import list_runs
    from sftjobs.status import FINAL_STATES, collect

    candidates = []
    for run in list_runs():  # list_runs only yields folders that hold a manifest
        paths = read_json_quiet(run / "plan.json").get("paths", {})
        if not (run / FINAL_STATES).exists() and output_dir in (paths.get("output_dir"), paths.get("dry_run_output_dir")):
            candidates.append(run)
    if not candidates:
        return []
    rows, _ = collect(candidates)
    return sorted({r.run for r in rows if r.state.live})


def read_json_quiet(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def submit(p: Prepared) -> dict:
    """Write the run directory and queue the chain. Submits into one run store take turns (a lock on the store):
    the check for a live run in the same output_dir and this run's queueing are one step, so two submits started
    at the same moment cannot both pass it. The train step itself also holds a lock on its output_dir."""
    p.executor.check(p.plan)  # the cluster can hold every step: before anything is written or queued
    store = p.run_dir.parent
    store.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(store):  # the store's folder itself: no lock file among the runs
        return _submit_locked(p)


def _submit_locked(p: Prepared) -> dict:
    output_dir = json.loads(p.files["plan.json"])["paths"]["output_dir"]
    busy = live_runs_using(output_dir)
    if busy:
        raise SftjobsError(f"run {busy[0]} is still running into {output_dir}; a second run there would clobber its "
                           f"checkpoints. Wait for it, `sftjobs cancel {busy[0]}`, or `sftjobs resume {busy[0]}` after it "
                           "stops; or set another output_dir.")
    write_run_dir(p.files, p.run_dir)
    manifest = {
        "run_id": p.run_id, "profile": p.profile.name, "profile_source": p.profile.source,
        "overrides": p.profile.overrides, "config_hash": p.profile.config_hash(), "config": p.profile.values,
        "executor": p.executor_name, "executor_reason": p.why, "dry_run_first": p.plan.dry_run_first,
        "submitted": time.time(), "sftjobs_version": __version__, "commit": project_commit(),
        "versions": library_versions(), "files": sorted(p.files), "jobs": {}, "state": "submitting",
        "history": [],
    }
    memory = memory_plan_of(p.files)
    if memory is not None:
        manifest["memory_plan"] = memory
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


def resume(run_dir: Path) -> tuple[dict, list[str]]:
    """Resubmit the steps of a run that did not complete; completed steps stay done, training resumes
    from the newest complete checkpoint."""
    from dataclasses import replace

    from sftjobs.status import FINAL_STATES, collect

    manifest = read_manifest(run_dir)
    rows, _ = collect([run_dir])
    live = [r.step for r in rows if r.state.live]
    if live:
        raise SftjobsError(f"run {manifest['run_id']} still has live steps ({', '.join(live)}); "
                           f"wait for them or `sftjobs cancel {manifest['run_id']}` first.")
    done = {r.step for r in rows if r.state.state == "COMPLETED"}
    plan = Plan.from_dict(json.loads((run_dir / "plan.json").read_text()))
    # a job runs again whole: its completed steps keep their records and are skipped there (preflight runs again:
    # it checks the node the new job lands on)
    again = {plan.job_of(s.name) for s in plan.steps if s.name not in done}
    todo = Plan(plan.profile, plan.dry_run_first,
                [replace(s, after=[p for p in s.after if p not in done or plan.job_of(p) in again])
                 for s in plan.steps if plan.job_of(s.name) in again])
    if not todo.steps:
        return manifest, []
    backend = executors.for_manifest(manifest, submitting=True)
    for name in (s.name for s in todo.steps if s.name not in done):  # the steps' own records of the earlier attempt
        (run_dir / "reports" / "status" / f"{name}.json").unlink(missing_ok=True)
    new_jobs = backend.submit(todo, run_dir)
    manifest.setdefault("history", []).append({"time": time.time(), "event": "resume",
                                               "previous_jobs": dict(manifest["jobs"]), "resubmitted": list(new_jobs)})
    manifest["jobs"] = {s.name: new_jobs.get(s.name, manifest["jobs"].get(s.name)) for s in plan.steps}
    (run_dir / FINAL_STATES).unlink(missing_ok=True)
    manifest["state"] = "submitted"
    write_manifest(run_dir, manifest)
    return manifest, list(new_jobs)

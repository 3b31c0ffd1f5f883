"""The run store: jobs/<run-id>/ folders and their manifest.json, readable without the process that made them.

One store per user, wherever sftjobs is run from: $XDG_DATA_HOME/sftjobs (~/.local/share/sftjobs when unset),
runs in its jobs/ folder. $SFTJOBS_JOBS_DIR (or --jobs-dir) names another runs folder, e.g. on a shared
filesystem the compute nodes see; the store is then the folder that holds it. Relative paths of a profile
(model.local_dir, data.dir, output_dir, ...) resolve against the store, so a model or data set downloaded for
one run is where the next run looks, whatever folder either was submitted from."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

from sftjobs.errors import SftjobsError
from sftjobs.fsutil import atomic_write_json, read_json

MANIFEST = "manifest.json"


def default_store() -> Path:
    """The per-user store, as XDG tools keep their data: $XDG_DATA_HOME/sftjobs, else ~/.local/share/sftjobs."""
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).expanduser().is_absolute() else Path.home() / ".local" / "share"
    return base / "sftjobs"


def jobs_dir() -> Path:
    """Where runs live: $SFTJOBS_JOBS_DIR (set by --jobs-dir too), else <store>/jobs."""
    configured = os.environ.get("SFTJOBS_JOBS_DIR")
    return Path(os.path.abspath(os.path.expanduser(configured))) if configured else default_store() / "jobs"


def store_dir() -> Path:
    """The folder relative profile paths resolve against (models/, data/, checkpoints/): the runs folder's parent."""
    return jobs_dir().parent


def set_jobs_dir(value: str) -> Path:
    """--jobs-dir DIR: checked, then exported so the local runner and every job see the same store."""
    if not value.strip():
        raise SftjobsError("--jobs-dir needs a directory, e.g. --jobs-dir /shared/$USER/sftjobs/jobs.")
    path = Path(os.path.abspath(os.path.expanduser(value)))
    if path.exists() and not path.is_dir():
        raise SftjobsError(f"--jobs-dir {value}: {path} exists and is not a directory. Give a directory for the runs.")
    os.environ["SFTJOBS_JOBS_DIR"] = str(path)
    return path


def new_run_id(profile_name: str) -> str:
    return f"{profile_name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def run_dir(run_id: str) -> Path:
    return jobs_dir() / run_id


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(directory / MANIFEST, manifest)


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        return read_json(path)
    except FileNotFoundError:
        raise SftjobsError(f"{directory} has no {MANIFEST}: it is not a submitted run.") from None
    except ValueError as exc:
        raise SftjobsError(f"{path} is not valid JSON ({exc}).") from None


def list_runs() -> list[Path]:
    """Submitted runs, oldest first."""
    root = jobs_dir()
    if not root.is_dir():
        return []
    runs = [p.parent for p in root.glob(f"*/{MANIFEST}")]
    return sorted(runs, key=lambda p: (p.joinpath(MANIFEST).stat().st_mtime, p.name))


def find_run(ref: str | None) -> Path:
    """RUN is a run id, a unique prefix of one, or a path; none or "last" means the newest run."""
    runs = list_runs()
    if ref is None or (ref == "last" and not Path(ref).joinpath(MANIFEST).is_file()):
        if not runs:
            raise SftjobsError(f"no runs in {jobs_dir()} yet. Start one with `sftjobs submit toy`.")
        return runs[-1]
    path = Path(ref)
    if path.joinpath(MANIFEST).is_file():
        return path.absolute()
    matches = [r for r in runs if r.name == ref] or [r for r in runs if r.name.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise SftjobsError(f"no run {ref!r} in {jobs_dir()}. `sftjobs status` lists the runs.")
    raise SftjobsError(f"{ref!r} matches several runs ({', '.join(m.name for m in matches[:5])}); give more of the id.")


def record_event(run_dir: Path, event: str, **fields) -> None:
    manifest = read_manifest(run_dir)
    manifest.setdefault("history", []).append({"time": time.time(), "event": event, **fields})
    write_manifest(run_dir, manifest)

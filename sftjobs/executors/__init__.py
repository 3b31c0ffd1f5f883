"""The executors behind one table: a name (profile's resources.executor, a manifest's "executor") -> backend.

Backends are imported on first use, so tracking a local run never imports submitit and a login node without
Slurm can still read runs.
"""

from __future__ import annotations

import importlib
import shutil

from sftjobs.errors import SftjobsError
from sftjobs.executors.base import Executor

# name -> (module, class); "auto" is resolved by choose() before this table is read
BACKENDS = {
    "slurm": ("sftjobs.executors.slurm", "SlurmExecutor"),
    "local": ("sftjobs.executors.local", "LocalExecutor"),
    "debug": ("sftjobs.executors.local", "DebugExecutor"),
}
ON_THIS_MACHINE = ("local", "debug")  # backends that run the chain here: one node only


def choose(requested: str) -> tuple[str, str]:
    """The executor name for a profile's (or --executor's) choice, and why it was chosen."""
    if requested != "auto":
        return requested, f"asked for {requested}"
    if shutil.which("sbatch"):
        return "slurm", f"sbatch found at {shutil.which('sbatch')}"
    return "local", "no sbatch on PATH, so the chain runs on this machine"


def backend(name: str, submitting: bool = False) -> Executor:
    """The backend called ``name``; ``submitting`` backends must be able to queue (sbatch), trackers need not."""
    try:
        module, cls = BACKENDS[name]
    except KeyError:
        raise SftjobsError(f"unknown executor {name!r}; choose one of: auto, {', '.join(BACKENDS)}.") from None
    kind = getattr(importlib.import_module(module), cls)
    return kind(need_sbatch=submitting) if name == "slurm" else kind()


def for_manifest(manifest: dict, submitting: bool = False) -> Executor:
    """The backend a run was submitted with; tracking it needs only squeue / sacct / scancel, not sbatch."""
    return backend(manifest["executor"], submitting=submitting)

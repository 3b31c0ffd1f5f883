"""One executor interface; backends (slurm, local, debug) specialise a few small methods.

Preview and submission share one code path: ``prepare`` builds the exact requests, ``preview`` prints them,
``submit`` sends them (TorchX's submit_dryrun / schedule split).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftjobs.planning.dag import Plan

# Slurm's words, used by every backend so status reads the same everywhere.
LIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "UNKNOWN"}
DONE_OK = "COMPLETED"


def squeue_time(seconds: float) -> str:
    """squeue's TIME format (%M): M:SS, H:MM:SS, D-HH:MM:SS; every backend's elapsed time is shown this way."""
    seconds = max(int(seconds), 0)
    days, rem = divmod(seconds, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def duration_seconds(text: str) -> int | None:
    """Slurm's elapsed forms ([D-]HH:MM:SS from sacct, M:SS / H:MM:SS / D-HH:MM:SS from squeue) -> seconds."""
    days, _, rest = text.strip().rpartition("-")
    try:
        parts = [int(float(p)) for p in rest.split(":")]
        total = 0
        for part in parts:
            total = total * 60 + part
        return int(days or 0) * 86400 + total
    except ValueError:
        return None


@dataclass
class Request:
    """What one job is sent as: the exact text the backend submits and the jobs it waits for (each named by its
    first step, the step whose launch script runs the job)."""

    step: str
    after: list[str]
    text: str


@dataclass
class StepState:
    state: str                        # PENDING RUNNING COMPLETED FAILED CANCELLED TIMEOUT OUT_OF_MEMORY ...
    reason: str = ""                  # squeue's %r (Dependency, DependencyNeverSatisfied, Resources, ...)
    elapsed: str = ""
    nodes: int | None = None
    nodelist: str = ""
    exit_code: str = ""
    restarts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.state.split()[0] in LIVE_STATES

    def where(self) -> str:
        """squeue's NODELIST(REASON): the reason while the job waits, else the nodes it ran on; sacct's
        "None assigned" for a job that ended without running (its Reason is the stale "Dependency")."""
        if self.state.split()[0] in ("PENDING", "REQUEUED") or (self.live and not self.nodelist):
            return f"({self.reason or 'None'})"
        return self.nodelist or "None assigned"

    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "extra": dict(self.extra)}  # flat fields: no need for asdict's deep copy


class Executor(abc.ABC):
    name: str = ""

    def check_run_dir(self, run_dir: Path) -> None:
        """Refuse a run directory this backend cannot hand on safely (before anything is written there).

        Every path is safe for the local backends; Slurm's overrides this (sbatch mangles some characters)."""
        return None

    def check(self, plan: Plan) -> str:
        """Refuse (SftjobsError) a plan no node of the cluster can run, before anything is queued; else a line
        saying what was checked ("" where there is nothing to check against: the local backends)."""
        return ""

    @abc.abstractmethod
    def prepare(self, plan: Plan, run_dir: Path) -> list[Request]:
        """The requests a submit would send, with placeholders for job ids not known yet."""

    @abc.abstractmethod
    def submit(self, plan: Plan, run_dir: Path) -> dict[str, str]:
        """Queue the whole chain; return step -> job id. On a partial failure, cancel what was queued and raise."""

    @abc.abstractmethod
    def states(self, run_dir: Path, jobs: dict[str, str]) -> dict[str, StepState]:
        """The current state of each step's job."""

    @abc.abstractmethod
    def cancel(self, run_dir: Path, job_ids: list[str]) -> None:
        """Cancel these jobs (already finished ones are ignored)."""

    def preview(self, plan: Plan, run_dir: Path) -> str:
        lines = [f"# executor: {self.name}", "# jobs and their dependencies (afterok); a job runs its steps in order:"]
        for host in plan.job_hosts():
            parents = ", ".join(plan.job_after(host)) or "-"
            steps = [s.name for s in plan.job_steps(host)]
            if plan.step(host).preflight:
                steps.insert(steps.index(host), "its node's pre-flight checks")
            runs = f"  runs {', '.join(steps)}" if len(steps) > 1 else ""
            lines.append(f"#   {host:<17} <- {parents}{runs}".rstrip())
        for request in self.prepare(plan, run_dir):
            lines += ["", f"# ===== step {request.step} =====", request.text.rstrip()]
        return "\n".join(lines) + "\n"

"""status / logs / cancel: read the manifests, ask the backends (squeue, sacct, PIDs) and the trainer's
own files (trainer_log.jsonl, the sampler) - no process from the submit has to be alive."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftjobs import executors
from sftjobs.errors import SftjobsError
from sftjobs.executors.base import StepState, duration_seconds, squeue_time
from sftjobs.fsutil import atomic_write_text, read_json
from sftjobs.io.monitor_log import latest_sample
from sftjobs.planning.dag import Plan
from sftjobs.runs import read_manifest, write_manifest

COLUMNS = ("RUN", "STEP", "JOBID", "STATE", "TIME", "NODES", "NODELIST(REASON)", "PROGRESS", "LOSS", "ETA", "GPU")
# The default table: one header line per run, then its steps; NODELIST(REASON) last, as in squeue's default format,
# where it is cut to fit. Columns dropped, in this order, while a row is wider than the terminal.
STEP_COLUMNS = ("STEP", "JOBID", "STATE", "TIME", "NODES", "PROGRESS", "LOSS", "ETA", "GPU", "NODELIST(REASON)")
# (JOBID before LOSS and ETA: the job ids are one `--wide` or `squeue -u $USER` away, a training ETA is not.)
DROP_ORDER = ("GPU", "NODES", "JOBID", "LOSS", "ETA")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}


@dataclass
class StepRow:
    run: str
    step: str
    job_id: str
    state: StepState
    progress: dict[str, Any] = field(default_factory=dict)
    monitor: dict[str, Any] | None = None

    def cells(self) -> list[str]:
        s = self.state
        where = s.where()
        gpu = ""
        if self.monitor and self.monitor.get("gpus"):
            gpus = self.monitor["gpus"]
            gpu = f"{sum(g['util'] for g in gpus) / len(gpus):.0f}% {max(g['mem_used_mib'] for g in gpus) / 1024:.1f}G"
        p = self.progress
        return [self.run, self.step, self.job_id, s.state + (f"[{s.restarts}]" if s.restarts else ""), s.elapsed or "0:00",
                "" if s.nodes is None else str(s.nodes), where,
                f"{p['current_steps']}/{p['total_steps']}" if p.get("total_steps") else "",
                f"{p['loss']:.4f}" if isinstance(p.get("loss"), (int, float)) else "", self.eta(), gpu]

    def eta(self) -> str:
        """The trainer's remaining time in squeue's TIME format, while the step runs (a finished, failed or
        cancelled step has none: its last logged ETA is stale)."""
        remaining = self.progress.get("remaining_time")
        if not remaining or not self.state.state.startswith("RUNNING"):
            return ""
        seconds = duration_seconds(str(remaining))
        return squeue_time(seconds) if seconds is not None else str(remaining)

    def named_cells(self) -> dict[str, str]:
        return dict(zip(COLUMNS, self.cells(), strict=True))

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "step": self.step, "job_id": self.job_id, **self.state.to_dict(),
                "progress": self.progress, "monitor": self.monitor}

    def to_cache(self) -> dict[str, Any]:
        return {"run": self.run, "step": self.step, "job_id": self.job_id, "state": self.state.to_dict(),
                "progress": self.progress, "monitor": self.monitor}

    @classmethod
    def from_cache(cls, data: dict[str, Any]) -> "StepRow":
        return cls(data["run"], data["step"], data["job_id"], StepState(**data["state"]), data["progress"],
                   data["monitor"])


def trainer_progress(output_dir: Path) -> dict[str, Any]:
    """The last line of LLaMA-Factory's trainer_log.jsonl (step, total, loss, ETA), read from the end."""
    path = output_dir / "trainer_log.jsonl"
    try:
        with open(path, "rb") as handle:
            size = os.path.getsize(path)
            handle.seek(max(0, size - 16384))
            lines = handle.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "current_steps" in entry:
            if entry.get("loss") is None:  # the final summary line has no loss: keep the last logged one
                for older in reversed(lines[:-1]):
                    try:
                        value = json.loads(older).get("loss")
                    except ValueError:
                        continue
                    if value is not None:
                        entry["loss"] = value
                        break
            return entry
    return {}


FINAL_STATES = "final_states.json"


def finished_run_cache(run_dir: Path) -> tuple[list[StepRow], list[str]] | None:
    """Rows and notes of a run whose every step had finished: it never changes again, so status reads them
    from this cache instead of asking Slurm and the trainer's files (deleting the cache is harmless)."""
    try:
        data = read_json(run_dir / FINAL_STATES)
        return [StepRow.from_cache(r) for r in data["rows"]], list(data["notes"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def step_marker(run_dir: Path, step: str) -> dict[str, Any] | None:
    try:
        return read_json(run_dir / "reports" / "status" / f"{step}.json")
    except (OSError, ValueError):
        return None


def run_states(run_dir: Path, manifest: dict[str, Any], slurm_snapshot: dict[str, StepState] | None,
               plan: Plan | None = None) -> dict[str, StepState]:
    jobs = manifest.get("jobs", {})
    if manifest["executor"] == "slurm" and slurm_snapshot is not None:
        states = {step: slurm_snapshot.get(job_id, StepState("UNKNOWN")) for step, job_id in jobs.items()}
    else:
        states = executors.for_manifest(manifest).states(run_dir, jobs)
    if plan is not None:
        for host in plan.job_hosts():
            names = [s.name for s in plan.job_steps(host) if s.name in states]
            if names and plan.shares_job(host):
                states.update(steps_in_job(run_dir, names, states, host))
    for step, state in states.items():
        if state.state == "UNKNOWN":  # neither squeue nor sacct knows: the step's own record does
            marker = step_marker(run_dir, step)
            if marker and marker.get("state") in ("COMPLETED", "FAILED"):
                state.state = marker["state"]
                state.reason = state.reason or "from the step's own record"
                state.exit_code = str(marker.get("exit_code", ""))
    return states


IN_JOB = "InJob"  # the reason of a step waiting inside its running job for the steps before it there


def steps_in_job(run_dir: Path, names: list[str], states: dict[str, StepState], host: str | None = None
                 ) -> dict[str, StepState]:
    """Each step of a job that runs several (the job's state is every step's backend state) gets its own state from
    its record (reports/status/STEP.json, written by the node runtime): COMPLETED and FAILED as recorded, RUNNING
    while it runs, PENDING (reason InJob) while it waits in the job for the steps before it, CANCELLED where an
    earlier step of the job failed; while the job itself waits, every step not yet completed shows the job's wait.
    A job that failed with no record at all (it died before the runtime started, e.g. in its launch script) is its
    host's failure (the step whose job it is: ``host``, else the first)."""
    job = states[names[0]]
    word = job.state.split()[0]
    records = {name: step_marker(run_dir, name) or {} for name in names}
    now = time.time()
    result: dict[str, StepState] = {}
    for name in names:
        record = records[name]
        mine = record.get("state")
        state = StepState(job.state, reason=job.reason, elapsed="0:00", nodes=job.nodes, nodelist=job.nodelist,
                          exit_code=job.exit_code, restarts=job.restarts, extra=dict(job.extra))
        if record.get("started"):
            state.elapsed = squeue_time((record.get("ended") or now) - record["started"]) if mine != "PENDING" else "0:00"
        code = record.get("exit_code")
        if mine == "COMPLETED":
            state.state, state.reason, state.exit_code = "COMPLETED", "", "0:0"
        elif mine == "FAILED":
            state.state, state.reason = "FAILED", "NonZeroExitCode"
            state.exit_code = f"{code}:0" if code is not None else job.exit_code
        elif word in ("PENDING", "REQUEUED", "CONFIGURING") or (job.live and word != "RUNNING"):
            state.elapsed = "0:00"  # the job waits (again, after a requeue): so does every step it has not done
        elif job.live:  # the job runs
            if mine in ("RUNNING", "STOPPED"):
                state.state, state.reason = "RUNNING", ""
            elif mine == "CANCELLED":  # an earlier step of the job failed: this one never ran
                state.state, state.reason = "CANCELLED", record.get("message") or ""
                state.elapsed, state.nodelist = "0:00", ""
            else:
                state.state, state.reason, state.elapsed = "PENDING", IN_JOB, "0:00"
        elif mine == "CANCELLED":
            state.state, state.reason = "CANCELLED", record.get("message") or "an earlier step of its job failed"
            state.elapsed, state.nodelist = "0:00", ""
        elif mine in ("RUNNING", "STOPPED"):  # the job ended under it: its end is this step's (TIMEOUT, CANCELLED ...)
            state.state = job.state if word != "COMPLETED" else "FAILED"
            state.elapsed = job.elapsed or state.elapsed  # no end of its own was recorded
        elif word == "COMPLETED":  # the runtime ends a job with success only when each of its steps did
            state.state, state.reason = "COMPLETED", ""
        elif (not any(r.get("state") for r in records.values()) and word != "CANCELLED"
              and name == (host if host in names else names[0])):
            pass  # the job died before any step of it could say so: the job's own state, on its host's row
        else:
            state.state, state.elapsed = "CANCELLED", "0:00"
            state.reason = state.reason if word == "CANCELLED" else f"its job ended {word} before it started"
            state.nodelist = ""
        result[name] = state
    return result


def mend_broken_chain(run_dir: Path, manifest: dict[str, Any], states: dict[str, StepState], plan: Plan) -> str | None:
    """A step that failed leaves its dependants PENDING (DependencyNeverSatisfied) on clusters without
    kill_invalid_depend: cancel them and say which step broke the chain and why."""
    failed = [s.name for s in plan.steps if s.name in states and states[s.name].state.split()[0] in TERMINAL
              and states[s.name].state != "COMPLETED"]
    if not failed:
        return None
    # a step that failed, before one cancelled because of it (a job that died at its start: its host failed, the
    # steps before the host in that job never ran)
    first = next((n for n in failed if states[n].state.split()[0] != "CANCELLED"), failed[0])
    jobs = manifest.get("jobs", {})
    own = jobs.get(first)  # the steps after it in its own job do not run: the job ends by itself
    victims = [name for name in plan.dependants(first) if name in states and states[name].live and jobs.get(name) != own]
    if victims and manifest.get("executor") == "slurm":
        executors.backend("slurm").cancel(run_dir, [manifest["jobs"][v] for v in victims])
        for victim in victims:
            states[victim].state = "CANCELLED"
            states[victim].reason = f"DependencyNeverSatisfied: {first} {states[first].state}"
        manifest.setdefault("history", []).append({"time": time.time(), "event": "chain_broken", "step": first,
                                                   "cancelled": victims})
        write_manifest(run_dir, manifest)
    return describe_break(run_dir, manifest, states, plan, first)


def _user(uid: str) -> str:
    import pwd

    try:
        return pwd.getpwuid(int(uid)).pw_name
    except (KeyError, ValueError):
        return f"uid {uid}"


def _sentence(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def describe_break(run_dir: Path, manifest: dict[str, Any], states: dict[str, StepState], plan: Plan, first: str) -> str:
    """What broke the chain, as a sentence: which step, what happened to it, and what that means for the rest."""
    s = states[first]
    word = s.state.split()[0]
    by = s.extra.get("cancelled_by_uid")
    started = bool(s.nodelist) and s.nodelist != "None assigned"
    ran = started and (duration_seconds(s.elapsed or "0") or 0) > 0
    if word == "CANCELLED":
        when = f" after {s.elapsed}" if ran else " as it started" if started else " before it started"
        what = f"was cancelled{' by ' + _user(by) if by else ''}{when}"
    elif word == "TIMEOUT":
        what = f"reached its time limit after {s.elapsed}"
    elif word == "OUT_OF_MEMORY":
        what = "ran out of memory (raise resources.mem)"
    else:
        code = f" with exit code {s.exit_code.split(':')[0]}" if s.exit_code and s.exit_code not in ("0", "0:0") else ""
        what = f"{word.lower().replace('_', ' ')}{code}"
    marker = step_marker(run_dir, first) or {}
    why = marker.get("message") or ""
    if not why and word != "CANCELLED":
        why = last_words(log_path(run_dir, manifest, first))
    after = [n for n in plan.dependants(first) if n in states]
    rest = f"; {', '.join(after)} did not run" if after else ""
    detail = f" ({_sentence(why)})" if why and not why.startswith("(no log") else ""
    hint = f" `sftjobs logs {manifest['run_id']} {first}` shows its log." if word != "CANCELLED" else ""
    return f"step {first} {what}{detail}{rest}.{hint}"


def collect(run_dirs: list[Path]) -> tuple[list[StepRow], list[str]]:
    """Rows for every step of these runs, and notes (broken chains, controller trouble)."""
    manifests = []
    for run_dir in run_dirs:
        try:
            manifests.append((run_dir, read_manifest(run_dir)))
        except SftjobsError as exc:
            manifests.append((run_dir, {"error": str(exc)}))
    snapshot = None
    slurm_ids = [j for run_dir, m in manifests if m.get("executor") == "slurm" and not (run_dir / FINAL_STATES).exists()
                 for j in m.get("jobs", {}).values()]
    if slurm_ids:
        snapshot = executors.backend("slurm").snapshot(slurm_ids)
    rows: list[StepRow] = []
    notes: list[str] = []
    for run_dir, manifest in manifests:
        if "error" in manifest:
            notes.append(manifest["error"])
            continue
        cached = finished_run_cache(run_dir)
        if cached:
            rows += cached[0]
            notes += cached[1]
            continue
        run_rows, run_notes, finished = run_rows_and_notes(run_dir, manifest, snapshot)
        rows += run_rows
        notes += run_notes
        if finished:
            cache = {"rows": [r.to_cache() for r in run_rows], "notes": run_notes}
            atomic_write_text(run_dir / FINAL_STATES, json.dumps(cache, separators=(",", ":")), durable=False)
    return rows, notes


def run_rows_and_notes(run_dir: Path, manifest: dict[str, Any],
                       snapshot: dict[str, StepState] | None) -> tuple[list[StepRow], list[str], bool]:
    plan_data = read_json(run_dir / "plan.json")
    plan = Plan.from_dict(plan_data)
    states = run_states(run_dir, manifest, snapshot, plan)
    notes = []
    broken = mend_broken_chain(run_dir, manifest, states, plan)
    if broken:
        notes.append(f"run {manifest['run_id']}: {broken}")
    troubles = {s.reason for s in states.values() if "unreachable" in s.reason or "unavailable" in s.reason}
    notes += [f"run {manifest['run_id']}: {t}; its states come from the steps' own records." for t in sorted(troubles)]
    if (note := tracking_note(plan_data.get("tracking"))) is not None:
        notes.append(f"run {manifest['run_id']}: {note}")
    rows = []
    for step in plan_data["steps"]:
        name = step["name"]
        if name not in states:
            continue
        row = StepRow(manifest["run_id"], name, manifest["jobs"].get(name, ""), states[name])
        if step["kind"] == "train":
            paths = plan_data["paths"]
            row.progress = trainer_progress(Path(paths["dry_run_output_dir" if step["target"] == "dry_run" else "output_dir"]))
            row.monitor = latest_sample(run_dir, name)
        rows.append(row)
    finished = bool(states) and all(s.state.split()[0] in TERMINAL for s in states.values())
    return rows, notes, finished


def tracking_note(tracking: dict[str, Any] | None) -> str | None:
    """Where a run's experiment tracking logs (plan.json's ``tracking``, written at render)."""
    if not tracking:
        return None
    if tracking["kind"] == "tensorboard":
        where = tracking["tensorboard_dir"]
        steps = ", ".join(sorted(tracking["logdirs"]))
        return f"TensorBoard logs in {where} (one folder per training step: {steps}); `tensorboard --logdir {where}`"
    runs = ", ".join(f"{step} {run_id}" for step, run_id in sorted(tracking["run_ids"].items()))
    return (f"W&B runs {runs} (mode and project from the job's environment; files under {tracking['wandb_dir']}/wandb "
            "unless WANDB_DIR was set); offline runs upload with `wandb sync`")


def format_table(rows: list[StepRow]) -> str:
    """The wide table (--wide, and the end of submit --wait): every column, one row per step, nothing cut."""
    cells = [list(COLUMNS)] + [r.cells() for r in rows]
    keep = [i for i in range(len(COLUMNS)) if i < 7 or any(row[i] for row in cells[1:])]
    widths = [max(len(row[i]) for row in cells) for i in keep]
    return "\n".join("  ".join(row[i].ljust(w) for i, w in zip(keep, widths, strict=False)).rstrip() for row in cells)


def fit_table(rows: list[StepRow], width: int, headers: dict[str, str] | None = None) -> str:
    """The default table, fitted to `width` columns: a line per run (headers[run]), then its steps; empty
    optional columns left out, then DROP_ORDER dropped while too wide, then NODELIST(REASON) cut (as squeue's
    %.NR would)."""
    named = [r.named_cells() for r in rows]
    columns = [c for c in STEP_COLUMNS if c not in ("PROGRESS", "LOSS", "ETA", "GPU") or any(n[c] for n in named)]

    def widths(cols):
        return {c: max([len(c)] + [len(n[c]) for n in named]) for c in cols}

    def total(cols):  # NODELIST(REASON) counted at its header's width at most: it is cut, not dropped
        w = widths(cols)
        w["NODELIST(REASON)"] = min(w["NODELIST(REASON)"], len("NODELIST(REASON)"))
        return sum(w.values()) + 2 * (len(cols) - 1)

    for drop in DROP_ORDER:
        if total(columns) <= width:
            break
        if drop in columns:
            columns.remove(drop)
    w = widths(columns)
    others = sum(w[c] for c in columns if c != "NODELIST(REASON)") + 2 * (len(columns) - 1)
    w["NODELIST(REASON)"] = min(w["NODELIST(REASON)"], max(width - others, 8))

    def line(values: dict[str, str]) -> str:
        return "  ".join(values[c][:w[c]].ljust(w[c]) for c in columns).rstrip()

    out = []
    run = None
    for row, cells in zip(rows, named, strict=True):
        if row.run != run:
            run = row.run
            out.append((headers or {}).get(run, run)[:width])
            out.append(line({c: c for c in columns}))
        out.append(line(cells))
    return "\n".join(out)


def run_state(rows: list[StepRow]) -> str:
    """One word for a run, in Slurm's words: RUNNING / PENDING while live, COMPLETED when every step did, else
    the first step's end that was not COMPLETED (FAILED, CANCELLED, TIMEOUT, ...)."""
    words = [r.state.state.split()[0] for r in rows]
    if any(r.state.live for r in rows):
        return "RUNNING" if any(w in ("RUNNING", "COMPLETING", "CONFIGURING") for w in words) else "PENDING"
    if words and all(w == "COMPLETED" for w in words):
        return "COMPLETED"
    return next((w for w in words if w != "COMPLETED"), "UNKNOWN")


def run_progress(rows: list[StepRow]) -> str:
    """e.g. "3/5 steps, train 40/100"."""
    done = sum(r.state.state == "COMPLETED" for r in rows)
    text = f"{done}/{len(rows)} steps"
    trained = [r for r in rows if r.progress.get("total_steps") and (r.state.live or r.state.state == "COMPLETED")]
    if trained:
        latest = trained[-1]
        text += f", {latest.step} {latest.progress['current_steps']}/{latest.progress['total_steps']}"
    return text


# ----------------------------------------------------------------------------- logs


def log_path(run_dir: Path, manifest: dict[str, Any], step: str) -> Path:
    """A step's log: its job's (the steps of one job write one log, each line of sftjobs' own tagged with the step)."""
    try:
        step = Plan.from_dict(read_json(run_dir / "plan.json")).job_of(step)
    except (OSError, ValueError, KeyError):
        pass
    if manifest["executor"] == "slurm":
        job_id = manifest["jobs"].get(step)
        return run_dir / "slurm" / step / f"{job_id}_0_log.out"
    return run_dir / "logs" / f"{step}.log"


def last_log_lines(run_dir: Path, manifest: dict[str, Any], step: str, count: int) -> str:
    path = log_path(run_dir, manifest, step)
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return f"(no log at {path})"
    return " | ".join(lines[-count:])


def last_words(path: Path) -> str:
    """The step's own last line in its log: before submitit's report of the exception (its "submitit ERROR"
    lines and traceback) and srun's "task 0: Exited with exit code 1"."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - 32768))
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    ours = next((i for i, line in enumerate(lines) if line.startswith("submitit ERROR")), len(lines))
    kept = [ln for ln in lines[:ours] if ln.strip() and not ln.startswith(("submitit ", "srun: "))]
    return kept[-1].strip() if kept else ""


def default_log_step(run_dir: Path, manifest: dict[str, Any]) -> str:
    """The step a user most likely wants: the first failed one, else the last one that started."""
    rows, _ = collect([run_dir])
    for row in rows:
        if row.state.state.split()[0] in TERMINAL - {"COMPLETED"}:
            return row.step
    started = [r.step for r in rows if r.state.state.split()[0] != "PENDING"]
    return started[-1] if started else rows[0].step


def follow(path: Path, still_running) -> Iterator[str]:
    """tail -f until the step stops running."""
    position = 0
    while True:
        done = not still_running()  # decided before the read, so the last lines are never missed
        if path.exists():
            with open(path, errors="replace", newline="") as handle:  # \r kept: a progress bar's updates
                handle.seek(position)
                chunk = handle.read()
                position = handle.tell()
            if chunk:
                yield chunk
        if done:
            break
        time.sleep(1.0)


def fold_progress(text: str) -> str:
    """Carriage-return updates folded as a terminal shows them: of each line, the last state written (a tqdm bar
    that rewrote itself 500 times with \\r is one line, its final state)."""
    lines = text.split("\n")  # not splitlines(): that splits at \r too
    return "\n".join(_fold_line(line) for line in lines)


def _fold_line(line: str) -> str:
    parts = [p for p in line.split("\r") if p]
    return parts[-1] if parts else ""


class ProgressFolder:
    """fold_progress for a log read in chunks (logs -f): whole lines are folded and passed on; the line still being
    written is held back, or on a terminal shown as its latest state redrawn in place."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.partial = ""
        self.shown = False  # the partial line is on the terminal (and gets redrawn, then replaced)

    def feed(self, chunk: str) -> str:
        text = self.partial + chunk
        cut = text.rfind("\n") + 1
        whole, self.partial = text[:cut], text[cut:]
        out = ("\r\x1b[K" if self.shown and whole else "") + fold_progress(whole)
        self.shown = self.shown and not whole
        if self.tty and self.partial:
            out += "\r\x1b[K" + _fold_line(self.partial)
            self.shown = True
        return out

    def close(self) -> str:
        rest = ("\r\x1b[K" if self.shown else "") + (_fold_line(self.partial) + "\n" if _fold_line(self.partial) else "")
        self.partial, self.shown = "", False
        return rest

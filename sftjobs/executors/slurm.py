"""Slurm backend: one sbatch job per step through submitit, chained with --dependency=afterok."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from sftjobs.errors import SftjobsError
from sftjobs.executors.base import Executor, Request, StepState, duration_seconds, squeue_time
from sftjobs.executors.slurm_cluster import (
    NO_LIMIT_MINUTES,
    SINFO_LIMITS,
    SINFO_NODES,
    Cluster,
    PartitionLimits,
    check_plan,
    parse_partition_limits,
    parse_sinfo_json,
    parse_sinfo_nodes,
    slurm_minutes,
)
from sftjobs.planning.dag import Plan, Step

# No job names: squeue -a lists every user's jobs, and a name is free text (a "|" or a newline in someone else's
# job name would shift the fields or forge a line); sftjobs tracks its jobs by id only.
SQUEUE_FORMAT = "%i|%T|%r|%D|%N|%M|%l"
SACCT_FIELDS = "JobID,State,ExitCode,Elapsed,NNodes,NodeList,Reason"
# sbatch reads #SBATCH lines one line at a time and takes a backslash as an escape even inside quotes (Slurm
# 22.05: a job name "a\b" becomes "ab"), and Slurm expands "%" in --output paths (%j, %x, ...): none of these
# can be quoted there. Spaces, quotes, $, ;, # and backticks are fine: submitit quotes them (shlex) and sbatch
# reads the quotes.
_SBATCH_UNQUOTABLE = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029\\%]")


def check_sbatch_text(text: str, what: str) -> None:
    """Refuse text bound for an #SBATCH line that sbatch cannot read back as written."""
    bad = _SBATCH_UNQUOTABLE.search(text)
    if bad:
        raise SftjobsError(
            f"{what} {text!r} holds {bad.group()!r}: it goes into the job's #SBATCH lines, where sbatch ends a line "
            "at a newline, drops backslashes and expands '%', so no control character, backslash or '%' can be "
            "quoted there. Use a path without them (set SFTJOBS_JOBS_DIR to another directory).")


# squeue's default format shows 8 characters of a job name (%.8j): a three-letter step tag and the run id's last
# four characters (its random suffix) fill them, so the steps of one run and the runs of one profile read apart
# there; the full run id follows for `squeue -o %j` and sacct.
STEP_TAGS = {"data": "dat", "model": "mdl", "preflight": "pre", "dry_run": "dry", "validate_dry_run": "vdr",
             "train": "trn", "validate": "val"}


def slurm_job_name(step: str, run_id: str) -> str:
    """e.g. trn-690a:demo-20261203-125454-690a (squeue's default column shows trn-690a)."""
    return f"{STEP_TAGS.get(step, step[:3])}-{run_id[-4:]}:{run_id}"


def sbatch_parameters(step: Step, parent_ids: list[str], job_name: str, implicit_minutes: int) -> dict:
    """submitit always writes --time (its default is 5 minutes): with resources.time null we write what Slurm
    would give the job without one (the partition's DefaultTime, else MaxTime), so both agree."""
    res = step.resources
    params: dict = dict(job_name=job_name, nodes=res.nodes, ntasks_per_node=1, cpus_per_task=res.cpus_per_task,
                        stderr_to_stdout=True, signal_delay_s=res.signal_delay_s)
    extra: dict = {}
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.exclusive:
        params["exclusive"] = True
    for key in ("partition", "account", "qos", "constraint", "mail_type", "mail_user"):
        if getattr(res, key):
            params[key] = getattr(res, key)
    params["time"] = slurm_minutes(res.time) if res.time else implicit_minutes
    if res.mem:
        extra["mem"] = res.mem
    if parent_ids:
        extra["dependency"] = "afterok:" + ":".join(parent_ids)
    for flag in res.sbatch_extra:
        name, sep, value = flag.lstrip("-").partition("=")
        extra[name.replace("-", "_")] = value if sep else True
    if extra:
        params["additional_parameters"] = extra
    return params


class SlurmExecutor(Executor):
    name = "slurm"

    def __init__(self, need_sbatch: bool = True):
        if need_sbatch and shutil.which("sbatch") is None:
            raise SftjobsError("the slurm executor needs sbatch on PATH; use --executor local on a machine without Slurm.")
        # submitit's own wrapper runs with this python on the node (the same venv, on a shared filesystem);
        # the step itself runs with the profile's launcher.python from the launch script. submitit puts a
        # python it is given into the command line as it is, so it is quoted here (a venv path with a space).
        self.python = shlex.quote(sys.executable)
        self._limits: dict[str, PartitionLimits] | None = None
        self._cluster: Cluster | None | bool = False  # False: not read yet

    def _executor(self, run_dir: Path, step: Step, parent_ids: list[str]):
        import submitit  # only submitting needs it; tracking (status, cancel) stays light

        self.check_run_dir(run_dir)
        job_name = slurm_job_name(step.name, run_dir.name)
        check_sbatch_text(job_name, "the Slurm job name")

        # submitit requeues a Checkpointable step that reaches its time limit at most max_num_timeout times
        # (default 3): a long run on a partition with a short MaxTime needs more
        executor = submitit.SlurmExecutor(folder=run_dir / "slurm" / step.name, python=self.python,
                                          max_num_timeout=step.resources.max_time_requeues)
        try:
            limits = self.limits_for(step)
            implicit = limits.implicit_minutes() if limits else NO_LIMIT_MINUTES
            executor.update_parameters(**sbatch_parameters(step, parent_ids, job_name, implicit))
        except ValueError as exc:
            raise SftjobsError(f"step {step.name}: bad sbatch parameters from the profile's resources: {exc}") from None
        return executor

    def check_run_dir(self, run_dir: Path) -> None:
        check_sbatch_text(str(run_dir / "slurm"), "the run directory")

    def prepare(self, plan: Plan, run_dir: Path) -> list[Request]:
        requests = []
        for host in plan.job_hosts():  # one sbatch job per job: its steps run in it one after another
            after = plan.job_after(host)
            placeholders = [f"{parent.upper()}_JOBID" for parent in after]
            executor = self._executor(run_dir, plan.step(host), placeholders)
            text = executor._make_submission_file_text(executor._submitit_command_str, "preview")
            requests.append(Request(host, after, text))
        return requests

    def limits_for(self, step: Step) -> PartitionLimits | None:
        if self._limits is None:
            self._limits = partition_limits()
        return self._limits.get(step.resources.partition or "*default*")

    def cluster(self) -> Cluster | None:
        if self._cluster is False:
            self._cluster = read_cluster()
        return self._cluster  # type: ignore[return-value]

    def check(self, plan: Plan) -> str:
        """Every step against its partition's nodes and time limit, before anything is queued."""
        cluster = self.cluster()
        if cluster is None:
            return "not checked: sinfo could not list the partitions' nodes (sbatch will judge each job)"
        return check_plan(plan, cluster)

    def submit(self, plan: Plan, run_dir: Path) -> dict[str, str]:
        self.check_run_dir(run_dir)  # what the profile and paths decide first, then the cluster
        self.check(plan)
        job_ids: dict[str, str] = {}
        for host in plan.job_hosts():
            step = plan.step(host)
            members = plan.job_steps(host)
            executor = self._executor(run_dir, step, [job_ids[p] for p in plan.job_after(host)])
            from sftjobs.executors.slurm_job import StepCommand

            command = StepCommand(str(run_dir / step.script), step.name,
                                  resumable=any(m.kind == "train" for m in members),
                                  signal_delay_s=step.resources.signal_delay_s)
            try:
                job = executor.submit(command)
            except Exception as exc:  # sbatch refused (bad partition, account, limits, ...)
                queued = list(dict.fromkeys(job_ids.values()))
                self.cancel(run_dir, queued)
                detail = str(exc).strip().splitlines()
                why = next((line for line in detail if "sbatch: error" in line), detail[-1] if detail else repr(exc))
                done = f"; cancelled the {len(queued)} job(s) already queued ({', '.join(queued)})" if queued else ""
                raise SftjobsError(f"sbatch refused step {step.name}: {why.strip()}{done}. "
                                   "Check resources.partition / account / qos / time in the profile.") from None
            for member in members:  # every step of the job is tracked by the job's id
                job_ids[member.name] = str(job.job_id)
        return {s.name: job_ids[s.name] for s in plan.steps}

    def states(self, run_dir: Path, jobs: dict[str, str]) -> dict[str, StepState]:
        snapshot = self.snapshot(list(jobs.values()))
        return {step: snapshot[job_id] for step, job_id in jobs.items()}

    @staticmethod
    def snapshot(job_ids: list[str]) -> dict[str, StepState]:
        """One squeue and one sacct call for any number of jobs (status over many runs stays fast)."""
        found: dict[str, StepState] = {}
        trouble = ""
        try:
            found.update(sacct_states(job_ids))
        except (OSError, subprocess.SubprocessError) as exc:
            trouble = f"sacct unavailable: {_first_line(exc)}"
        try:
            live = squeue_states()
        except (OSError, subprocess.SubprocessError) as exc:
            live = {}
            trouble = f"slurmctld unreachable: {_first_line(exc)}"
        wanted = set(job_ids)
        for job_id, state in live.items():
            if job_id in wanted:
                state.restarts = found[job_id].restarts if job_id in found else 0
                found[job_id] = state  # squeue knows the live reason (Dependency, DependencyNeverSatisfied, ...)
        result = {}
        for job_id in job_ids:
            state = found.get(job_id) or StepState("UNKNOWN", reason=trouble or "not in squeue or sacct")
            if trouble and not state.reason:
                state.reason = trouble
            result[job_id] = state
        return result

    def cancel(self, run_dir: Path, job_ids: list[str]) -> None:
        job_ids = list(dict.fromkeys(job_ids))  # steps of one job share its id
        if job_ids:
            subprocess.run(["scancel", *job_ids], check=False, capture_output=True, timeout=60)


def _first_line(exc: BaseException) -> str:
    text = getattr(exc, "stderr", None) or str(exc)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text.strip().splitlines() or [""])[0]


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout


def squeue_states() -> dict[str, StepState]:
    """Every job slurmctld knows now (one call however many runs are tracked)."""
    return parse_squeue(_run(["squeue", "-h", "-a", "-o", SQUEUE_FORMAT]))


def sacct_states(job_ids: list[str]) -> dict[str, StepState]:
    if not job_ids:
        return {}
    return parse_sacct(_run(["sacct", "-X", "-D", "-n", "-P", "-o", SACCT_FIELDS, "-j", ",".join(job_ids)]))


def _state_word(state: str) -> tuple[str, dict]:
    """sacct's "CANCELLED by 1000" -> CANCELLED, with the uid kept aside (status says who in words)."""
    word, _, rest = state.partition(" by ")
    return word.strip(), ({"cancelled_by_uid": rest.strip()} if rest.strip() else {})


def _time(text: str) -> str:
    seconds = duration_seconds(text)
    return squeue_time(seconds) if seconds is not None else text


def parse_squeue(text: str) -> dict[str, StepState]:
    """squeue -h -o '%i|%T|%r|%D|%N|%M|%l' -> job id -> state (the live reason, the nodes of a running job)."""
    states = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) != 7:
            continue
        job_id, state, reason, nodes, nodelist, elapsed, _limit = fields
        word, extra = _state_word(state)
        states[job_id] = StepState(word, reason="" if reason == "None" else reason, elapsed=_time(elapsed),
                                   nodes=int(nodes) if nodes.isdigit() else None, nodelist=nodelist, extra=extra)
    return states


def parse_sacct(text: str) -> dict[str, StepState]:
    """sacct -X -D -P -o JobID,State,ExitCode,Elapsed,NNodes,NodeList,Reason -> job id -> state. -D lists every
    requeued run of a job: the last row is the current one, the others restarts. sacct keeps the Reason a job
    last waited for ("Dependency") after it ran: where() shows the node list for such a job, not the reason."""
    states: dict[str, StepState] = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) != 7:
            continue
        job_id, state, exit_code, elapsed, nodes, nodelist, reason = fields
        if not re.fullmatch(r"\d+", job_id):
            continue
        restarts = states[job_id].restarts + 1 if job_id in states else 0
        word, extra = _state_word(state)
        states[job_id] = StepState(word, reason="" if reason == "None" else reason, elapsed=_time(elapsed),
                                   nodes=int(nodes) if nodes.isdigit() else None,
                                   nodelist="" if nodelist == "None assigned" else nodelist,
                                   exit_code=exit_code, restarts=restarts, extra=extra)
    return states


def partition_limits() -> dict[str, PartitionLimits]:
    """partition name -> its time limits; "*default*" is the default partition."""
    try:
        return parse_partition_limits(_run(SINFO_LIMITS))
    except (OSError, subprocess.SubprocessError):
        return {}  # the controller will judge; nothing to check against


def read_cluster() -> Cluster | None:
    """The partitions' nodes and limits, from ``sinfo -N`` (``sinfo --json`` where that fails); None when
    sinfo cannot tell (then sbatch is the only judge)."""
    limits = partition_limits()
    try:
        nodes, default = parse_sinfo_nodes(_run(SINFO_NODES))
    except (OSError, subprocess.SubprocessError, ValueError):
        try:
            nodes, default = parse_sinfo_json(_run(["sinfo", "--json"])), None
        except (OSError, subprocess.SubprocessError, ValueError, KeyError):
            return None
    if not nodes:
        return None
    return Cluster(nodes, limits, default)

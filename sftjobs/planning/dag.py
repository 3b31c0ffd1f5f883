"""Profile -> Plan: the steps to run, their resources and their afterok parents. Pure: no files, no cluster."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sftjobs.profile import Profile

TRAIN_KINDS = ("train",)


@dataclass
class Resources:
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = 1  # None: Slurm's default (all of the node's CPUs on an exclusive step)
    mem: str | None = None         # None: Slurm's default; "0" on an exclusive step: all of the node's memory
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    sbatch_extra: list[str] = field(default_factory=list)
    signal_delay_s: int = 120  # USR2 this long before the time limit: a training step requeues itself
    max_time_requeues: int = 10  # ... this many times at most (submitit's max_num_timeout)
    exclusive: bool = False  # the step takes every GPU of its nodes, so it asks for the whole nodes
    mail_type: str | None = None  # sbatch --mail-type (FAIL on every step, the user's types on the last)
    mail_user: str | None = None
    local_trainings: int = 1  # local executor: trainings of this user at once on the machine (the rest wait)


@dataclass
class Step:
    name: str            # unique within a run: data, model, preflight, dry_run, validate_dry_run, train, validate
    kind: str            # what runs: data | model | preflight | train | validate
    after: list[str]     # afterok parents
    resources: Resources
    script: str          # launch script, relative to the run directory (a step inside another's job: that job's)
    target: str | None = None  # the training config a train/validate step works on (full | dry_run)
    # The step whose Slurm (or local) job runs this one, on that job's node and in order after the steps before it
    # there (None: a job of its own). Preflight and the dry run's validation run inside the GPU training job, so the
    # chain waits for an 8-GPU node once per training, not five times, and preflight checks the node that trains.
    job: str | None = None
    preflight: bool = False  # a train step that checks its node first (its job holds no preflight step of its own)


@dataclass
class Plan:
    profile: str
    dry_run_first: bool
    steps: list[Step]

    def step(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        steps = [Step(**{**s, "resources": Resources(**s["resources"])}) for s in data["steps"]]
        return cls(profile=data["profile"], dry_run_first=data["dry_run_first"], steps=steps)

    def job_of(self, name: str) -> str:
        """The step whose job runs ``name`` (the job's first-named step, its host)."""
        return self.step(name).job or name

    def job_hosts(self) -> list[str]:
        """One name per job, in the order the jobs are queued (a job after the jobs it waits on)."""
        hosts: list[str] = []
        for step in self.steps:
            if step.job is None and step.name not in hosts:
                hosts.append(step.name)
        return sorted(hosts, key=lambda h: min(i for i, s in enumerate(self.steps) if (s.job or s.name) == h))

    def job_steps(self, host: str) -> list[Step]:
        """The steps one job runs, in the order it runs them."""
        return [s for s in self.steps if (s.job or s.name) == host]

    def job_after(self, host: str) -> list[str]:
        """The jobs (by host) this job waits on with afterok: its steps' parents outside the job."""
        parents: list[str] = []
        for step in self.job_steps(host):
            for parent in step.after:
                other = self.job_of(parent)
                if other != host and other not in parents:
                    parents.append(other)
        return parents

    def shares_job(self, name: str) -> bool:
        """Whether a step's job runs more than this step (its row's state comes from the step's own record)."""
        host = self.job_of(name)
        return len(self.job_steps(host)) > 1 or self.step(host).preflight

    def dependants(self, name: str) -> list[str]:
        """Every step that (transitively) waits on ``name``, in plan order."""
        broken = {name}
        for step in self.steps:
            if broken.intersection(step.after):
                broken.add(step.name)
        return [s.name for s in self.steps if s.name in broken and s.name != name]


def build_plan(profile: Profile, dry_run_first: bool = False) -> Plan:
    res = profile.values["resources"]
    shared = dict(partition=res["partition"], account=res["account"], qos=res["qos"],
                  constraint=res["constraint"], sbatch_extra=list(res["sbatch_extra"]),
                  signal_delay_s=res["signal_delay_s"], max_time_requeues=res["max_time_requeues"],
                  local_trainings=res["local_trainings"])
    cpus = res["cpus_per_task"]
    cpu = Resources(nodes=1, gpus_per_node=0, cpus_per_task=min(res["cpu_step_cpus"], cpus or res["cpu_step_cpus"]),
                    mem=res["cpu_step_mem"], time=_time(res["cpu_step_time"]), **shared)
    gpus = res["gpus_per_node"]
    # A step that takes every GPU of a node leaves nothing on it for anyone else: it asks for the whole node
    # (--exclusive), and where the profile sets no mem / cpus_per_task, for all of its memory (--mem=0) and CPUs.
    whole = gpus > 0 and gpus == res["max_gpus_per_node"]
    gpu_mem = res["mem"] if res["mem"] is not None or not whole else "0"
    train = Resources(nodes=res["nodes"], gpus_per_node=gpus, cpus_per_task=cpus, mem=gpu_mem,
                      time=_time(res["time"]), exclusive=whole, **shared)
    # The final validation is inference of one model: one GPU (when training has any), the CPU steps' CPUs and
    # memory, never the whole node (a job of its own, so the node's other GPUs are free for others meanwhile).
    one_gpu = Resources(nodes=1, gpus_per_node=min(gpus, 1), cpus_per_task=cpu.cpus_per_task, mem=res["cpu_step_mem"],
                        time="01:00:00", **shared)

    # Jobs (afterok between them): data, model, [dry run], train, validate. The first GPU job runs preflight on
    # its own node before it trains; with --dry-run-first it also validates the dry run after training, and the
    # full training's job checks its own node again first (step.preflight) - a requeued job checks its new node.
    first = "dry_run" if dry_run_first else "train"
    steps = [
        Step("data", "data", [], cpu, "steps/data.sh"),
        Step("model", "model", [], cpu, "steps/model.sh"),
        Step("preflight", "preflight", ["data", "model"], train, f"steps/{first}.sh", job=first),
    ]
    gate = "preflight"
    if dry_run_first:
        steps += [
            Step("dry_run", "train", ["preflight"], train, "steps/dry_run.sh", target="dry_run"),
            Step("validate_dry_run", "validate", ["dry_run"], train, "steps/dry_run.sh", target="dry_run",
                 job="dry_run"),
        ]
        gate = "validate_dry_run"
    steps += [
        Step("train", "train", [gate], train, "steps/train.sh", target="full", preflight=dry_run_first),
        Step("validate", "validate", ["train"], one_gpu, "steps/validate.sh", target="full"),
    ]
    steps = [replace(s, resources=replace(s.resources)) for s in steps]  # own copies
    _add_mail(steps, res["mail_type"], res["mail_user"])
    return Plan(profile=profile.name, dry_run_first=dry_run_first, steps=steps)


# Mail on failure of any step; the user's own types on the last step of the chain (the run's end).
FAILURE_MAIL = "FAIL"


def _add_mail(steps: list[Step], mail_type: str | None, mail_user: str | None) -> None:
    if mail_type is None and mail_user is None:
        return
    types = [t for t in (mail_type or "END,FAIL").split(",") if t]
    if types == ["NONE"]:
        return
    last = types if {"ALL", FAILURE_MAIL} & set(types) else types + [FAILURE_MAIL]
    for step in steps:
        step.resources.mail_type = ",".join(last) if step is steps[-1] else FAILURE_MAIL
        step.resources.mail_user = mail_user


def resource_keys(step: Step) -> dict[str, str]:
    """The profile keys behind a step's CPUs, memory and time (named in the errors the cluster check gives)."""
    if step.kind in ("data", "model"):
        return {"cpus": "resources.cpu_step_cpus", "mem": "resources.cpu_step_mem", "time": "resources.cpu_step_time"}
    if step.job is None and step.kind == "validate":  # the final validation: one GPU, the CPU steps' size, an hour
        return {"cpus": "resources.cpu_step_cpus", "mem": "resources.cpu_step_mem", "time": ""}
    return {"cpus": "resources.cpus_per_task", "mem": "resources.mem", "time": "resources.time"}  # a training job


def _time(value: str | int | None) -> str | None:
    return None if value is None else str(value)

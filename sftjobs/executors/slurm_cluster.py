"""What the cluster's partitions can hold, read before anything is queued.

A request no node of its partition can satisfy is refused by sbatch only when that one job is submitted (the
chain's earlier jobs are queued by then), or queued and left PENDING for ever (a --time over MaxTime). Here the
partition's nodes are read once (``sinfo -N``, or ``sinfo --json``) and every step of the plan is held against
them: constraint, GPUs, CPUs, memory, node count and the time limit, each refusal naming the profile key and what
the partition has. The parsers take the commands' text, so tests/slurm_output/ holds recorded output for them.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

from sftjobs.errors import SftjobsError
from sftjobs.planning.dag import Plan, Step, resource_keys

# One line per (node, partition): name | partition ("*" marks the default) | CPUs | RealMemory (MB) | Gres |
# available features. Node names, partition names, gres and features never hold a "|".
SINFO_NODES = ["sinfo", "-N", "-h", "-a", "-o", "%N|%P|%c|%m|%G|%f"]
SINFO_LIMITS = ["sinfo", "-h", "-a", "-o", "%P|%l|%L"]
NO_LIMIT_MINUTES = 365 * 24 * 60


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int
    features: frozenset[str] = frozenset()
    partitions: tuple[str, ...] = ()

    def describe(self) -> str:
        feats = ",".join(sorted(self.features)) or "none"
        return f"{_count(self.cpus, 'CPU')}, {self.mem_mb}M memory, {_count(self.gpus, 'GPU')}, features {feats}"


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


@dataclass(frozen=True)
class PartitionLimits:
    name: str
    max_minutes: int | None      # MaxTime; None = infinite
    default_minutes: int | None  # DefaultTime; None = not set (Slurm then uses MaxTime)

    def implicit_minutes(self) -> int:
        """What Slurm gives a job without --time, in minutes (a year stands for infinite)."""
        return self.default_minutes or self.max_minutes or NO_LIMIT_MINUTES


@dataclass
class Cluster:
    nodes: list[Node]
    limits: dict[str, PartitionLimits] = field(default_factory=dict)  # + "*default*"
    default: str | None = None

    def partition(self, name: str | None) -> str | None:
        return name or self.default or (self.limits["*default*"].name if "*default*" in self.limits else None)

    def nodes_in(self, partition: str) -> list[Node]:
        return [n for n in self.nodes if partition in n.partitions]

    def partition_names(self) -> list[str]:
        names = {p for n in self.nodes for p in n.partitions} | {k for k in self.limits if k != "*default*"}
        return sorted(names)


# ----------------------------------------------------------------------------- parsing


def slurm_minutes(value: str) -> int:
    """Slurm's --time forms (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> whole minutes, rounded up."""
    days, _, rest = value.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    total = (int(days or 0) * 24 + hours) * 60 + minutes + (1 if seconds else 0)
    return max(total, 1)


def _limit_minutes(text: str) -> int | None:
    return None if text.strip() in ("infinite", "n/a", "", "UNLIMITED", "NONE") else slurm_minutes(text.strip())


def gpu_count(gres: str) -> int:
    """GPUs in a node's Gres: "gpu:8", "gpu:a100:4(S:0-1),gpu:v100:2", "(null)" -> 8, 6, 0."""
    gres = re.sub(r"\([^)]*\)", "", gres)  # socket bindings, which may hold commas
    total = 0
    for item in gres.split(","):
        parts = item.strip().split(":")
        if parts[0] != "gpu":
            continue
        count = parts[-1] if len(parts) > 1 else "1"
        total += int(count) if count.isdigit() else 1  # "gpu:a100" without a count is one
    return total


def _features(text: str) -> frozenset[str]:
    return frozenset(f for f in text.split(",") if f and f not in ("(null)", "null"))


def parse_sinfo_nodes(text: str) -> tuple[list[Node], str | None]:
    """``sinfo -N -h -a -o '%N|%P|%c|%m|%G|%f'`` -> the nodes (with all their partitions) and the default
    partition."""
    rows: dict[str, Node] = {}
    default = None
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 6 or not fields[0]:
            continue
        name, partition, cpus, mem, gres, feats = fields
        if partition.endswith("*"):
            partition = default = partition.rstrip("*")
        node = Node(name, int(cpus.rstrip("+")), int(mem.rstrip("+")), gpu_count(gres), _features(feats))
        known = rows.get(name)
        partitions = (known.partitions if known else ()) + (partition,)
        rows[name] = Node(node.name, node.cpus, node.mem_mb, node.gpus, node.features, partitions)
    return list(rows.values()), default


def _number(value) -> int:
    """A JSON number, or Slurm's newer {"set": true, "number": N} form."""
    if isinstance(value, dict):
        return int(value.get("number", 0)) if value.get("set", True) and not value.get("infinite") else 0
    return int(value or 0)


def parse_sinfo_json(text: str) -> list[Node]:
    """``sinfo --json`` (Slurm 22.05's "nodes" list) -> the nodes. It does not say which partition is the
    default: that comes from the limits (``sinfo -o %P``)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"sinfo --json gave no JSON: {exc}") from None
    nodes = []
    for entry in data.get("nodes") or []:
        feats = entry.get("features") or ""
        if isinstance(feats, list):
            feats = ",".join(feats)
        nodes.append(Node(entry["name"], _number(entry.get("cpus")), _number(entry.get("real_memory")),
                          gpu_count(entry.get("gres") or ""), _features(feats), tuple(entry.get("partitions") or ())))
    return nodes


def parse_partition_limits(text: str) -> dict[str, PartitionLimits]:
    """``sinfo -h -a -o '%P|%l|%L'`` -> partition name -> its time limits; "*default*" is the default one."""
    limits: dict[str, PartitionLimits] = {}
    for line in text.splitlines():
        name, max_time, default_time = (line.strip().split("|") + ["", ""])[:3]
        if not name:
            continue
        is_default = name.endswith("*")
        name = name.rstrip("*")
        limits[name] = PartitionLimits(name, _limit_minutes(max_time), _limit_minutes(default_time))
        if is_default:
            limits["*default*"] = limits[name]
    return limits


# ----------------------------------------------------------------------------- checking


def mem_mb(value: str) -> int:
    """A Slurm memory size (64G, 16000M, 500, 1T) -> MB (no suffix means MB)."""
    number, unit = re.fullmatch(r"(\d+)([KMGT]?)", value.strip().upper()).groups()
    if unit == "K":
        return -(-int(number) // 1024)
    return int(number) * {"": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]


def constraint_matches(constraint: str, features: frozenset[str]) -> bool | None:
    """Slurm's --constraint with & (and) and | (or); None where it uses more (brackets, counts): Slurm judges."""
    if not re.fullmatch(r"[A-Za-z0-9_.:=+-]+([&|][A-Za-z0-9_.:=+-]+)*", constraint):
        return None
    return any(all(f in features for f in alt.split("&")) for alt in constraint.split("|"))


def _summary(nodes: list[Node]) -> str:
    kinds = Counter(n.describe() for n in nodes)
    return "; ".join(f"{count} node{'s' if count > 1 else ''} with {what}" for what, count in kinds.most_common())


def _extra_flags(step: Step) -> set[str]:
    """Flags resources.sbatch_extra sets itself (they win in the script): those requests are sbatch's to judge."""
    return {flag.lstrip("-").partition("=")[0] for flag in step.resources.sbatch_extra}


def check_step(step: Step, cluster: Cluster) -> str | None:
    """The first request of this step no node of its partition can satisfy, as a message; None if it fits."""
    res, keys = step.resources, resource_keys(step)
    extra = _extra_flags(step)
    if "partition" in extra:
        return None
    name = cluster.partition(res.partition)
    if name is None:
        return None  # no default partition known: sbatch decides
    if name not in cluster.partition_names():
        return (f"step {step.name}: resources.partition {name!r} is not a partition of this cluster (it has "
                f"{', '.join(cluster.partition_names()) or 'none'}). Set resources.partition to one of them.")
    limits = cluster.limits.get(name)
    if res.time and "time" not in extra and limits is not None and limits.max_minutes is not None and slurm_minutes(res.time) > limits.max_minutes:
        key = f" ({keys['time']})" if keys["time"] else ""
        fix = (f"Lower {keys['time']}, or choose another resources.partition." if keys["time"] else
               "It always asks for an hour: choose a resources.partition whose MaxTime is at least 1 hour.")
        return (f"step {step.name} asks for --time={res.time}{key} but partition {name} allows at most "
                f"{limits.max_minutes} minutes (MaxTime); it would wait PENDING for ever. {fix}")
    where = f"partition {name}" + (" (the default; resources.partition is null)" if not res.partition else "")
    fitting = cluster.nodes_in(name)
    has = f"it has {_summary(fitting)}" if fitting else "it has no nodes"
    wants: list[str] = []

    def refuse(what: str, key: str, fix: str) -> str:
        also = f" with {' and '.join(wants)}" if wants else ""
        return (f"step {step.name} asks for {what} ({key}), but no node of {where}{also} has that: {has}. {fix}")

    if res.constraint and "constraint" not in extra:
        match = [n for n in fitting if constraint_matches(res.constraint, n.features) is not False]
        if not match:
            return refuse(f"nodes with features {res.constraint!r}", "resources.constraint",
                          "Change or remove resources.constraint, or choose another resources.partition.")
        fitting, wants = match, wants + [f"features {res.constraint}"]
    if res.gpus_per_node and not extra & {"gpus-per-node", "gres", "gpus", "gpus-per-task"}:
        match = [n for n in fitting if n.gpus >= res.gpus_per_node]
        if not match:
            return refuse(f"{_count(res.gpus_per_node, 'GPU')} on a node", "resources.gpus_per_node",
                          "Lower resources.gpus_per_node (and max_gpus_per_node to what a node has), use more "
                          "resources.nodes, or choose another resources.partition.")
        fitting, wants = match, wants + [_count(res.gpus_per_node, "GPU")]
    if res.cpus_per_task and "cpus-per-task" not in extra:
        match = [n for n in fitting if n.cpus >= res.cpus_per_task]
        if not match:
            return refuse(f"{_count(res.cpus_per_task, 'CPU')} on a node", keys["cpus"],
                          f"Lower {keys['cpus']}" + (" (null takes every CPU of a whole-node step)"
                                                     if keys["cpus"] == "resources.cpus_per_task" else "")
                          + ", or choose another resources.partition.")
        fitting, wants = match, wants + [_count(res.cpus_per_task, "CPU")]
    if res.mem and mem_mb(res.mem) > 0 and not extra & {"mem", "mem-per-cpu", "mem-per-gpu"}:
        match = [n for n in fitting if n.mem_mb >= mem_mb(res.mem)]
        if not match:
            return refuse(f"{res.mem} of memory on a node", keys["mem"],
                          f"Lower {keys['mem']}" + (" (null takes all of a whole-node step's memory)"
                                                    if keys["mem"] == "resources.mem" else "")
                          + ", or choose another resources.partition.")
        fitting, wants = match, wants + [f"{res.mem} memory"]
    if len(fitting) < res.nodes and "nodes" not in extra:
        such = f" with {' and '.join(wants)}" if wants else ""
        return (f"step {step.name} asks for {res.nodes} nodes{such} (resources.nodes), but {where} has "
                f"{len(fitting)} such node(s): {has}. Lower resources.nodes to {len(fitting)} or fewer, or choose "
                "another resources.partition.")
    return None


def check_plan(plan: Plan, cluster: Cluster) -> str:
    """Raise SftjobsError for the first job no node can take; else a one-line summary of what was checked. A job is
    named by its first step (the steps inside another step's job ask for nothing of their own)."""
    for step in (plan.step(host) for host in plan.job_hosts()):
        problem = check_step(step, cluster)
        if problem:
            raise SftjobsError(problem + " Nothing was queued.")
    used = sorted({p for p in (cluster.partition(s.resources.partition) for s in plan.steps
                               if "partition" not in _extra_flags(s)) if p})
    if not used:
        return "not checked: no default partition known, or resources.sbatch_extra sets --partition (sbatch judges)"
    return "every step fits a node of " + "; ".join(f"partition {p} ({_summary(cluster.nodes_in(p))})" for p in used)

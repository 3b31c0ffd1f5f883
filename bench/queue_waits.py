"""Queue waits of prod's chain on a busy cluster, before and after one change (the Slurm test cluster).

Another user (``sftbench``, made here with ``useradd`` and an association in the cluster's accounting) keeps the
two nodes of the test cluster busy: sleep jobs that each take 7 of a node's 8 GPUs, 6 of its 8 CPUs and 6000M of its
8000M, two at the start (one per node) and then one every ``--interval-s`` seconds, each for a duration drawn from a
fixed seed, so nodes free at intervals; they outrank the chain's jobs (as other users' jobs often do under
fair-share), so a freed node goes to a waiting load job first. A job that wants a whole 8-GPU node waits until a
node frees with no load job waiting; a job that wants 1 GPU and a little memory fits beside a load job. Under that
load each tree submits prod's chain (``--dry-run-first``, the test cluster's fake GPUs, the tests' stand-in steps
that each sleep ``--step-s`` seconds and train nothing: tests/slurm/fake_step_python.sh of that tree), and this
script records:

- queue waits: the chain's jobs that went PENDING on resources or priority (any reason other than Dependency,
  BeginTime or None) for 3 s or more (squeue polled every second; a job placed at once shows such a reason for an
  instant), and the seconds each waited so;
- seconds from submit to the first training step (the dry run's step starting: its stand-in writes
  fake/dry_run.0.env as it starts), to the full training's start (fake/train.0.env), and to the end of the chain
  (the last job's End in sacct).

Run as root on the machine of the test cluster (tests/slurm/start-slurm.sh), e.g. against main's commit ae63870:

    git -C /work/main worktree add /tmp/before ae63870
    .venv/bin/python bench/queue_waits.py --before /tmp/before --after . \\
        --out bench/results/queue_waits_testcluster_2026-12-04.json

Both trees run under the same load (the same seed, so the same sequence of load durations), one after the
other; ``--rounds N`` alternates them N times (before, after, before, after, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LOAD_USER = "sftbench"
ACCOUNT = "sftjobs_test"  # tests/slurm/start-slurm.sh's account
# the tests' sizes (tests/slurm_helpers.SMALL) on 8-CPU 8000M nodes; prod keeps 8 GPUs, so its GPU jobs take the node
SMALL = ["resources.cpus_per_task=2", "resources.mem=500M", "resources.cpu_step_cpus=1",
         "resources.cpu_step_mem=300M", "resources.time=00:10:00", "resources.cpu_step_time=00:10:00"]
LOAD_SHAPE = ["--gpus-per-node=7", "--cpus-per-task=6", "--mem=6000M"]
NOT_A_WAIT = {"Dependency", "BeginTime", "None", ""}
MIN_WAIT_S = 3.0  # more than the test cluster's scheduler interval (sched_interval=2) and the 1 s polling


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def ensure_load_user() -> None:
    if run(["id", LOAD_USER]).returncode != 0:
        subprocess.run(["useradd", "-m", LOAD_USER], check=True)
    assoc = run(["sacctmgr", "-n", "-P", "list", "user", LOAD_USER, "format=user"]).stdout
    if LOAD_USER not in assoc:
        subprocess.run(["sacctmgr", "-i", "add", "user", LOAD_USER, f"account={ACCOUNT}",
                        f"defaultaccount={ACCOUNT}"], check=True, capture_output=True)


class Load:
    """Another user's jobs on a fixed schedule: two at once (one per node), then one every ``interval_s``, each a
    7-GPU sleep of a duration drawn from ``rng``, at most ``max_jobs``; each outranks the chain's jobs (as other
    users' jobs do on a shared cluster under fair-share: an administrator's ``scontrol update priority``), so a
    node that frees goes to a waiting load job first. Stops when told."""

    PRIORITY = 4_294_967_000  # above priority/basic's (about 2**32 - 66,000 for the first job, less for later ones)

    def __init__(self, seed: int, low_s: int, high_s: int, interval_s: float, max_jobs: int):
        rng = random.Random(seed)
        self.schedule = [(0.0 if k < 2 else (k - 1) * interval_s, rng.randint(low_s, high_s)) for k in range(max_jobs)]
        self.submitted: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _submit(self, seconds: int) -> None:
        out = run(["runuser", "-u", LOAD_USER, "--", "sbatch", "--parsable", "-A", ACCOUNT, "-J", "load",
                   *LOAD_SHAPE, "-o", "/dev/null", "--wrap", f"sleep {seconds}"], cwd="/tmp")
        if out.returncode != 0:
            raise RuntimeError(f"the load's sbatch failed: {out.stderr.strip()}")
        job_id = out.stdout.strip()
        raised = run(["scontrol", "update", f"JobId={job_id}", f"Priority={self.PRIORITY}"])
        if raised.returncode != 0:
            raise RuntimeError(f"could not raise the load job's priority: {raised.stderr.strip()}")
        self.submitted.append(job_id)

    def _loop(self) -> None:
        started = time.time()
        for at, seconds in self.schedule:
            if self.stop.wait(max(0.0, started + at - time.time())):
                return
            self._submit(seconds)

    def start_and_fill(self) -> None:
        self.thread.start()
        deadline = time.time() + 120
        while time.time() < deadline:  # both nodes busy before the chain comes
            running = run(["squeue", "-h", "-u", LOAD_USER, "-t", "RUNNING", "-o", "%N"]).stdout.split()
            if len(set(running)) >= 2:
                return
            time.sleep(0.5)
        raise RuntimeError("the load never filled both nodes")

    def end(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        run(["scancel", "-u", LOAD_USER])
        deadline = time.time() + 120
        while time.time() < deadline and run(["squeue", "-h", "-u", LOAD_USER]).stdout.strip():
            time.sleep(1)


def chain_env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_", "SFTJOBS_"))}
    env["PYTHONPATH"] = str(tree)
    env["SFTJOBS_FAKE_REAL_PYTHON"] = sys.executable
    env["SFTJOBS_FAKE_STEPS"] = str(tree / "tests" / "slurm" / "fake_steps.py")  # the tree's own, where it has one
    return env


def submit_chain(tree: Path, jobs_dir: Path, step_s: int) -> tuple[float, dict[str, str], Path]:
    env = {**chain_env(tree), "SFTJOBS_JOBS_DIR": str(jobs_dir), "FAKE_SLEEP": str(step_s)}
    args = [sys.executable, "-m", "sftjobs", "submit", "prod", "--dry-run-first", "--executor", "slurm",
            "--set", f"launcher.python={tree / 'tests' / 'slurm' / 'fake_step_python.sh'}"]
    for item in SMALL:
        args += ["--set", item]
    started = time.time()
    out = run(args, env=env, cwd=str(jobs_dir.parent))
    if out.returncode != 0:
        raise RuntimeError(f"submit from {tree} failed: {out.stderr.strip()}")
    run_id = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("run "))
    run_dir = jobs_dir / run_id
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return started, manifest["jobs"], run_dir


def sacct_times(job_ids: list[str]) -> dict[str, dict[str, str]]:
    out = run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,Submit,Start,End", "-j", ",".join(job_ids)]).stdout
    rows = {}
    for line in out.splitlines():
        job_id, state, submit, start, end = line.split("|")
        rows[job_id] = {"state": state, "submit": submit, "start": start, "end": end}
    return rows


def epoch(text: str) -> float | None:
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def measure(label: str, tree: Path, step_s: int, seed: int, load_s: tuple[int, int], interval_s: float,
            max_load: int, timeout_s: int) -> dict:
    load = Load(seed, *load_s, interval_s, max_load)
    load.start_and_fill()
    work = Path(tempfile.mkdtemp(prefix=f"queue-waits-{label}-"))
    jobs_dir = work / "jobs"
    try:
        submitted, jobs, run_dir = submit_chain(tree, jobs_dir, step_s)
        by_job: dict[str, list[str]] = {}
        for step, job_id in jobs.items():
            by_job.setdefault(job_id, []).append(step)
        waits: dict[str, dict] = {j: {"steps": s, "reasons": [], "wait_s": 0.0} for j, s in by_job.items()}
        whole = sum(1 for j in by_job if "OverSubscribe=NO" in run(["scontrol", "-o", "show", "job", j]).stdout)
        deadline = submitted + timeout_s
        last = time.time()
        while time.time() < deadline:
            out = run(["squeue", "-h", "-j", ",".join(by_job), "-o", "%i|%T|%r"]).stdout
            now = time.time()
            live = 0
            for line in out.splitlines():
                job_id, state, reason = line.split("|")
                if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED"):
                    continue
                live += 1
                if state == "PENDING" and reason not in NOT_A_WAIT:
                    waits[job_id]["wait_s"] += now - last
                    if reason not in waits[job_id]["reasons"]:
                        waits[job_id]["reasons"].append(reason)
            last = now
            if live == 0:
                break
            time.sleep(1.0)
        else:
            raise RuntimeError(f"{label}: the chain did not end within {timeout_s} s")
        time.sleep(3)  # sacct lags squeue
        times = sacct_times(list(by_job))
        ends = [epoch(t["end"]) for t in times.values() if epoch(t["end"])]
        first_train = run_dir / "fake" / "dry_run.0.env"
        full_train = run_dir / "fake" / "train.0.env"
        states = {steps[0] if len(steps) == 1 else "+".join(steps): times.get(j, {}).get("state")
                  for j, steps in by_job.items()}
        return {
            "label": label, "tree": str(tree), "jobs": len(by_job), "whole_node_jobs": whole,
            # a job that waited on resources or priority for longer than the scheduler's pass (Slurm shows the
            # reason for an instant as it places a job on a free node: that is no wait)
            "queue_waits": sum(1 for w in waits.values() if w["wait_s"] >= MIN_WAIT_S),
            "pending_on_resources_at_all": sum(1 for w in waits.values() if w["reasons"]),
            "queue_wait_s": round(sum(w["wait_s"] for w in waits.values()), 1),
            "submit_to_first_training_step_s": round(first_train.stat().st_mtime - submitted, 1)
            if first_train.exists() else None,
            "submit_to_full_training_s": round(full_train.stat().st_mtime - submitted, 1) if full_train.exists() else None,
            "submit_to_chain_end_s": round(max(ends) - submitted, 1) if ends else None,
            "job_states": states,
            "per_job": {("+".join(w["steps"])): {"waited_s": round(w["wait_s"], 1), "reasons": w["reasons"]}
                        for w in waits.values()},
            "load_jobs_submitted": len(load.submitted),
        }
    finally:
        load.end()
        shutil.rmtree(work, ignore_errors=True)


def commit_of(tree: Path) -> str:
    return run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"]).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the old tree (a git worktree of the old commit)")
    parser.add_argument("--after", type=Path, default=Path(__file__).resolve().parent.parent, help="the new tree")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=1, help="before/after pairs, alternating")
    parser.add_argument("--step-s", type=int, default=5, help="seconds each stand-in step sleeps")
    parser.add_argument("--load-s", type=int, nargs=2, default=(20, 60), metavar=("LOW", "HIGH"),
                        help="each load job sleeps a whole number of seconds drawn from [LOW, HIGH]")
    parser.add_argument("--interval-s", type=float, default=20.0, help="seconds between the load's jobs")
    parser.add_argument("--max-load-jobs", type=int, default=60, help="the load's bound (jobs per measurement)")
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--timeout-s", type=int, default=900)
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: it makes the load's user and submits as it (runuser)")
    ensure_load_user()
    results = []
    for round_ in range(args.rounds):
        for label, tree in (("before", args.before.resolve()), ("after", args.after.resolve())):
            result = measure(label, tree, args.step_s, args.seed + round_, tuple(args.load_s), args.interval_s,
                             args.max_load_jobs, args.timeout_s)
            result["round"] = round_
            print(json.dumps({k: result[k] for k in ("label", "round", "queue_waits", "queue_wait_s",
                                                     "submit_to_first_training_step_s", "submit_to_chain_end_s")}),
                  flush=True)
            results.append(result)

    def mean(label: str, key: str) -> float | None:
        values = [r[key] for r in results if r["label"] == label and r[key] is not None]
        return round(sum(values) / len(values), 1) if values else None

    keys = ("queue_waits", "pending_on_resources_at_all", "queue_wait_s", "submit_to_first_training_step_s", "submit_to_full_training_s",
            "submit_to_chain_end_s")
    record = {
        "what": "prod's chain (--dry-run-first) on the Slurm test cluster under another user's load",
        "date": time.strftime("%Y-%m-%d"),
        "machine": "Slurm 22.05 test cluster (tests/slurm/start-slurm.sh): 2 nodes x 8 fake GPUs, 8 CPUs, 8000M, "
                   "on a 2-core VM",
        "before_commit": commit_of(args.before), "after_commit": commit_of(args.after),
        "load": {"user": LOAD_USER, "shape": LOAD_SHAPE, "sleep_s": list(args.load_s), "first": 2,
                 "interval_s": args.interval_s, "max_jobs": args.max_load_jobs, "seed": args.seed,
                 "priority": "above the chain's (scontrol update Priority)"},
        "queue_wait": f"a chain job PENDING on resources or priority for {MIN_WAIT_S:.0f} s or more",
        "chain": {"profile": "prod", "dry_run_first": True, "sets": SMALL, "step_s": args.step_s,
                  "steps": "the tests' stand-ins (tests/slurm/fake_step_python.sh of each tree): no training"},
        "mean": {label: {k: mean(label, k) for k in keys} for label in ("before", "after")},
        "runs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["mean"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Local backend (no Slurm): the same chain, run in dependency order on this machine by a detached runner
process that outlives the submitting shell; debug backend: the same chain in this process, for pdb.

State lives in local/chain.json (written atomically), so status reads it like a tiny squeue; PIDs are
checked with psutil so a runner that died is reported, not shown RUNNING forever.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from sftjobs.errors import SftjobsError
from sftjobs.executors.base import Executor, Request, StepState, squeue_time
from sftjobs.fsutil import atomic_write_json, exclusive_lock, read_json
from sftjobs.planning.dag import Plan, Step
from sftjobs.waiting import wait_with_signals

STATE_FILE = "local/chain.json"


def _fmt_elapsed(seconds: float) -> str:
    return squeue_time(seconds)


class ChainState:
    """local/chain.json: {"runner_pid", "steps": {name: {state, reason, pid, started, ended, exit_code}}}."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / STATE_FILE

    def read(self) -> dict:
        try:
            return read_json(self.path)
        except FileNotFoundError:
            raise SftjobsError(f"{self.path} is missing: this run was not started by the local executor.") from None

    def write(self, data: dict) -> None:
        atomic_write_json(self.path, data)

    def update(self, step: str, **fields) -> None:
        data = self.read()
        data["steps"][step].update(fields)
        self.write(data)


def step_log(run_dir: Path, step: str) -> Path:
    return run_dir / "logs" / f"{step}.log"


# invoke(step, run_dir, started, waiting) runs a job's host step and returns its exit code; it calls started() when
# the job really starts (a training once it holds its slot) and waiting(reason) while it waits
Invoke = Callable[[Step, Path, Callable[[], None], Callable[[str], None]], int]


class ChainRunner:
    """Runs a plan's jobs in order; a failed job cancels everything downstream (DependencyNeverSatisfied). A job
    that runs several steps keeps one state for all of them here, as Slurm does for a job; status reads each step's
    own record for its row."""

    def __init__(self, plan: Plan, run_dir: Path, invoke: Invoke):
        self.plan, self.run_dir, self.invoke = plan, run_dir, invoke
        self.state = ChainState(run_dir)

    def update(self, host: str, **fields) -> None:
        data = self.state.read()
        for step in self.plan.job_steps(host):
            data["steps"][step.name].update(fields)
        self.state.write(data)

    def run(self) -> bool:
        for host in self.plan.job_hosts():
            step = self.plan.step(host)
            steps = self.state.read()["steps"]
            if steps[host]["state"] != "PENDING":
                continue  # cancelled meanwhile
            broken = [p for p in self.plan.job_after(host) if p in steps and steps[p]["state"] != "COMPLETED"]
            if broken:
                self.update(host, state="CANCELLED", ended=time.time(),
                            reason=f"DependencyNeverSatisfied ({broken[0]} {steps[broken[0]]['state']})")
                continue
            code = self.invoke(step, self.run_dir,
                               lambda host=host: self.update(host, state="RUNNING", reason="", started=time.time(),
                                                             pid=os.getpid()),
                               lambda why, host=host: self.update(host, state="PENDING", reason=why))
            current = self.state.read()["steps"][host]["state"]
            if current == "CANCELLED":
                continue
            self.update(host, state="COMPLETED" if code == 0 else "FAILED", exit_code=f"{code}:0",
                        ended=time.time(), reason="" if code == 0 else "NonZeroExitCode")
        return all(s["state"] == "COMPLETED" for s in self.state.read()["steps"].values())


def _run_script(step: Step, run_dir: Path, on_start: Callable[[int], None] | None = None) -> int:
    log = step_log(run_dir, step.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        process = subprocess.Popen(["bash", str(run_dir / step.script)], stdout=handle, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        if on_start:
            on_start(process.pid)
        return wait_with_signals(process)  # `sftjobs cancel`'s SIGTERM is handled at once, whichever thread gets it


def initial_state(plan: Plan, runner_pid: int | None, keep_from: Path | None = None) -> dict:
    """Every step of ``plan`` PENDING; on a resume, the steps that completed before keep their record."""
    steps = {}
    if keep_from is not None and keep_from.exists():
        steps = {name: entry for name, entry in read_json(keep_from)["steps"].items()
                 if entry["state"] == "COMPLETED" and name not in {s.name for s in plan.steps}}
    for s in plan.steps:
        steps[s.name] = {"state": "PENDING", "reason": "Dependency" if s.after else "None", "pid": None,
                         "started": None, "ended": None, "exit_code": ""}
    return {"runner_pid": runner_pid, "submitted": time.time(), "steps": steps}


class LocalExecutor(Executor):
    name = "local"

    def prepare(self, plan: Plan, run_dir: Path) -> list[Request]:
        return [Request(h, plan.job_after(h), f"bash {shlex.quote(str(run_dir / plan.step(h).script))}  > "
                                              f"{shlex.quote(str(step_log(run_dir, h)))} 2>&1")
                for h in plan.job_hosts()]

    def submit(self, plan: Plan, run_dir: Path) -> dict[str, str]:
        state = ChainState(run_dir)
        state.write(initial_state(plan, None, keep_from=state.path))
        log = run_dir / "local" / "runner.log"
        with open(log, "ab") as handle:
            runner = subprocess.Popen([sys.executable, "-m", "sftjobs.executors.local", str(run_dir)],
                                      stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                      start_new_session=True, cwd=run_dir)
        data = state.read()
        data["runner_pid"] = runner.pid
        state.write(data)
        return job_ids(plan, runner.pid)

    def states(self, run_dir: Path, jobs: dict[str, str]) -> dict[str, StepState]:
        data = ChainState(run_dir).read()
        runner_alive = _alive(data.get("runner_pid"))
        now = time.time()
        result = {}
        for name, entry in data["steps"].items():
            state, reason = entry["state"], entry.get("reason", "")
            if state in ("RUNNING", "PENDING") and not runner_alive and data.get("runner_pid"):
                state, reason = ("FAILED", "runner process gone") if state == "RUNNING" else ("CANCELLED", "runner process gone")
            started, ended = entry.get("started"), entry.get("ended")
            elapsed = _fmt_elapsed((ended or now) - started) if started else "0:00"
            live = state in ("RUNNING", "PENDING")
            result[name] = StepState(state, reason=reason if reason != "None" else "", elapsed=elapsed,
                                     nodes=1, nodelist="localhost" if started else "",
                                     exit_code=entry.get("exit_code", ""), extra={"pid": entry.get("pid") if live else None})
        return result

    def cancel(self, run_dir: Path, job_ids: list[str]) -> None:
        data = ChainState(run_dir).read()
        pid = data.get("runner_pid")
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not _alive(pid):
                    break
                time.sleep(0.1)


class DebugExecutor(LocalExecutor):
    """The chain in this process, in the foreground: each step's Python runs here (breakpoints work)."""

    name = "debug"

    def prepare(self, plan: Plan, run_dir: Path) -> list[Request]:
        return [Request(h, plan.job_after(h), f"in-process: sftjobs.steps {h} --run-dir {shlex.quote(str(run_dir))}")
                for h in plan.job_hosts()]

    def submit(self, plan: Plan, run_dir: Path) -> dict[str, str]:
        from sftjobs.node.runtime import main as step_main

        state = ChainState(run_dir)
        state.write(initial_state(plan, os.getpid()))

        def invoke(step: Step, rd: Path, started: Callable[[], None], waiting: Callable[[str], None]) -> int:
            started()
            return step_main([step.name, "--run-dir", str(rd)])

        ChainRunner(plan, run_dir, invoke).run()
        return job_ids(plan, os.getpid())


def job_ids(plan: Plan, pid: int) -> dict[str, str]:
    """step -> "PID.N", N the job's place in the chain: the steps of one job share its id, as on Slurm."""
    number = {host: i for i, host in enumerate(plan.job_hosts())}
    return {s.name: f"{pid}.{number[plan.job_of(s.name)]}" for s in plan.steps}


SLOT_DIR = Path(tempfile.gettempdir()) / f"sftjobs-{os.getuid()}-local-slots"


@contextlib.contextmanager
def training_slot(slots: int, waiting: Callable[[str], None], got: Callable[[], None], poll_s: float = 2.0):
    """One of ``slots`` trainings of this user on this machine (flock on a slot file; a crashed holder frees its
    slot). Two local trainings at once would each take every CPU thread, or share a GPU; the others wait here,
    PENDING with the reason saying for what."""
    told = False
    while True:
        for index in range(slots):
            with exclusive_lock(SLOT_DIR / f"train-{index}.lock", blocking=False) as fd:
                if fd is None:
                    continue
                got()
                yield
                return
        if not told:
            waiting(f"LocalTrainingSlot: {slots} training(s) of this user already run on this machine "
                    "(resources.local_trainings)")
            told = True
        time.sleep(poll_s)


STOP_WAIT_S = 170  # under cancel's default wait (180 s): a training step's save at the signal, then SIGKILL


def _stop_group(pid: int, wait_s: float) -> None:
    """SIGTERM to the process group led by ``pid`` (our child), wait for the leader to exit, SIGKILL the group after
    ``wait_s``. Reaped with os.waitpid: this runs in a signal handler that interrupted Popen.wait on the same child."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _runner_main(run_dir: Path) -> int:
    """The detached runner: ``python -m sftjobs.executors.local RUN_DIR``."""
    plan = Plan.from_dict(read_json(run_dir / "plan.json"))
    state = ChainState(run_dir)
    current: dict[str, int | None] = {"pid": None}

    def on_term(signum, frame):  # sftjobs cancel: the steps not started, then the running step's process group
        data = state.read()
        for entry in data["steps"].values():
            if entry["state"] == "PENDING":
                entry.update(state="CANCELLED", reason="cancelled by user", ended=time.time())
        state.write(data)
        if current["pid"]:
            # SIGTERM to every process of the step, as Slurm sends it: a training step saves the optimizer step it
            # is on and exits. The step stays RUNNING until it has, so `resume` right after `cancel` starts no second
            # writer; past STOP_WAIT_S it is killed.
            _stop_group(current["pid"], STOP_WAIT_S)
        data = state.read()
        for entry in data["steps"].values():
            if entry["state"] in ("PENDING", "RUNNING"):
                entry.update(state="CANCELLED", reason="cancelled by user", ended=time.time())
        state.write(data)
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_term)

    def invoke(step: Step, rd: Path, started: Callable[[], None], waiting: Callable[[str], None]) -> int:
        def on_pid(pid: int) -> None:
            current["pid"] = pid
            state.update(step.name, pid=pid)
        if step.kind != "train":
            started()
            code = _run_script(step, rd, on_pid)
        else:
            # RUNNING only once the slot is taken: until then the job shows PENDING (LocalTrainingSlot), never
            # RUNNING beside the training that holds the slot
            with training_slot(step.resources.local_trainings, waiting, started):
                code = _run_script(step, rd, on_pid)
        current["pid"] = None
        return code

    return 0 if ChainRunner(plan, run_dir, invoke).run() else 1


if __name__ == "__main__":
    raise SystemExit(_runner_main(Path(sys.argv[1])))

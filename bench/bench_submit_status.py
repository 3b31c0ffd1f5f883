"""Benchmark (issue 3): queueing a chain costs < 2 s beyond sbatch's own time; status over 200 runs < 1 s.

The floor is as many bare sbatch calls as the chain has jobs (prod --dry-run-first: 5 jobs for its 7 steps since
the steps of one node share a job).

Needs the Slurm test cluster (tests/slurm/start-slurm.sh). Writes bench/results/submit_status.json.
Run: .venv/bin/python bench/bench_submit_status.py
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAKE = REPO / "tests" / "slurm" / "fake_step_python.sh"
SMALL = ["resources.cpus_per_task=1", "resources.mem=200M", "resources.cpu_step_cpus=1", "resources.cpu_step_mem=200M",
         "resources.time=00:05:00", "resources.cpu_step_time=00:05:00", f"launcher.python={FAKE}"]


def sbatch_time(n: int) -> float:
    """Seconds for n bare sbatch calls (held, then cancelled): the floor no tool can go under."""
    ids = []
    start = time.perf_counter()
    for _ in range(n):
        out = subprocess.run(["sbatch", "--parsable", "--hold", "-n1", "--mem=10M", "--wrap=true"], check=True,
                             capture_output=True, text=True).stdout
        ids.append(out.strip().split(";")[0])
    elapsed = time.perf_counter() - start
    subprocess.run(["scancel", *ids], check=False)
    return elapsed


def main() -> int:
    sys.path.insert(0, str(REPO))
    from sftjobs.cli import main as cli

    work = Path(tempfile.mkdtemp(prefix="sftjobs-bench-"))
    os.environ["SFTJOBS_JOBS_DIR"] = str(work / "jobs")
    os.chdir(work)
    results: dict = {"machine": "2-core CPU VM (no GPU), Slurm 22.05 test cluster on the same host",
                     "date": time.strftime("%Y-%m-%d")}
    submits, floors, jobs = [], [], []
    for i in range(3):
        args = ["submit", "prod", "--dry-run-first", "--executor", "slurm", "--set", "resources.gpus_per_node=1",
                "--set", f"output_dir={work}/ck{i}", "--set", f"model.local_dir={work}/model", "--set", f"data.dir={work}/data"]
        for item in SMALL:
            args += ["--set", item]
        start = time.perf_counter()
        assert cli(args) == 0
        submits.append(time.perf_counter() - start)
        run = sorted((work / "jobs").iterdir())[-1]
        manifest = json.loads((run / "manifest.json").read_text())
        queued = list(dict.fromkeys(manifest["jobs"].values()))  # one id per job; the steps of a job share it
        subprocess.run(["scancel", *queued], check=False)
        jobs.append(len(queued))
        floors.append(sbatch_time(len(queued)))
    overhead = [s - f for s, f in zip(submits, floors, strict=True)]
    results["chain_steps"] = len(manifest["jobs"])
    results["chain_jobs"] = jobs
    results["submit_chain_s"] = [round(x, 3) for x in submits]
    results["sbatch_alone_same_number_of_calls_s"] = [round(x, 3) for x in floors]
    results["overhead_beyond_sbatch_s_median"] = round(statistics.median(overhead), 3)
    results["overhead_target_s"] = 2.0

    # 200 live runs: one more chain, held in the queue (--hold) so every job stays PENDING, and 200 copies of
    # it (same real job ids, so squeue/sacct answer for 200 x the chain's steps). Nothing is finished, so nothing is cached.
    args = ["submit", "prod", "--dry-run-first", "--executor", "slurm", "--set", "resources.gpus_per_node=1",
            "--set", f"output_dir={work}/ck-held", "--set", f"model.local_dir={work}/model",
            "--set", f"data.dir={work}/data", "--set", "resources.sbatch_extra=['--hold']"]
    for item in SMALL:
        args += ["--set", item]
    assert cli(args) == 0
    template = sorted((work / "jobs").iterdir(), key=lambda p: p.stat().st_mtime)[-1]
    held = list(dict.fromkeys(json.loads((template / "manifest.json").read_text())["jobs"].values()))
    for old in (work / "jobs").iterdir():
        if old != template:
            shutil.rmtree(old)
    for i in range(199):
        target = work / "jobs" / f"bench-{i:03d}"
        shutil.copytree(template, target, ignore=shutil.ignore_patterns("slurm"))
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["run_id"] = target.name
        (target / "manifest.json").write_text(json.dumps(manifest))

    def timed_status() -> tuple[float, subprocess.CompletedProcess]:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "sftjobs", "status", "--all", "--wide"], capture_output=True, text=True, cwd=work,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        assert out.returncode == 0, out.stderr
        return time.perf_counter() - start, out

    live = [timed_status() for _ in range(3)]
    results["status_runs"] = len(list((work / "jobs").iterdir()))
    results["status_rows"] = sum(1 for line in live[-1][1].stdout.splitlines()[1:] if not line.startswith("note:"))
    results["status_live_s"] = [round(t, 3) for t, _ in live]
    results["status_live_s_median"] = round(statistics.median(t for t, _ in live), 3)
    results["status_target_s"] = 1.0
    subprocess.run(["scancel", *held], check=False)
    time.sleep(3)
    results["status_first_after_all_finished_s"] = round(timed_status()[0], 3)  # writes each run's cache once
    results["status_finished_cached_s"] = round(statistics.median(timed_status()[0] for _ in range(3)), 3)
    out_path = REPO / "bench" / "results" / "submit_status.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    if not os.environ.get("KEEP"):
        shutil.rmtree(work, ignore_errors=True)
    else:
        print("kept", work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The measuring half of bench/requeue_save.sh: the train step of a rendered run, USR2 at a step, then a resume.

    python bench/requeue_probe.py RUN_DIR OUTPUT_DIR SIGNAL_AT SAVE_STEPS OUT.json CARD GPUS
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path


def logged(output_dir: Path) -> list[tuple[int, str | None]]:
    """(step, the trainer's elapsed_time) for every logged loss in trainer_log.jsonl."""
    path = output_dir / "trainer_log.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["current_steps"], r.get("elapsed_time")) for r in records if "loss" in r]


def hms(text: str) -> float:
    parts = [float(p) for p in text.split(":")]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def wait(predicate, limit: float, process: subprocess.Popen) -> bool:
    end = time.time() + limit
    while time.time() < end:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def main() -> None:
    run, ck = Path(sys.argv[1]), Path(sys.argv[2])
    signal_at, save_steps, out, card, gpus = int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]), sys.argv[6], sys.argv[7]
    env = {**os.environ, "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": gpus, "NNODES": "1", "MASTER_PORT": "29631",
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "TORCH_CUDNN_SDPA_DEPRIORITIZED": "1"}

    def launch(name: str) -> subprocess.Popen:
        log = open(run.parent / name, "w")
        return subprocess.Popen([sys.executable, "-m", "sftjobs.steps", "train", "--run-dir", str(run)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)

    def newest() -> int:
        return max([s for s, _ in logged(ck)] or [0])

    result: dict = {"card": card, "gpus": int(gpus), "profile": "prod as configs/prod.yaml stands, bs 1 x ga 2 per GPU",
                    "save_steps": save_steps}
    first = launch("train1.log")
    started = time.time()
    if not wait(lambda: newest() >= signal_at, 420, first):
        sys.exit(f"the train step did not reach step {signal_at} (exit {first.poll()}); see train1.log")
    signal_sent = time.time()
    first.send_signal(signal.SIGUSR2)  # to the step's runtime, as submitit's checkpoint() passes it on
    code = first.wait(timeout=600)
    stopped = time.time()
    marker = json.loads((run / "reports" / "stops" / "train.json").read_text())
    checkpoint = Path(marker["checkpoint"])
    size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    result.update({"exit_code": code, "signal_at_step": newest(), "saved_step": marker["step"],
                   "save_s": round(marker["save_seconds"], 1), "signal_to_exit_s": round(stopped - signal_sent, 1),
                   "checkpoint_gb": round(size / 1e9, 1), "launch_to_signal_s": round(signal_sent - started, 1)})
    print(json.dumps(result), flush=True)

    second = launch("train2.log")
    relaunched = time.time()
    reached = wait(lambda: newest() > marker["step"], 420, second)
    first_new = time.time() if reached else None
    if reached:
        wait(lambda: newest() >= marker["step"] + 10, 240, second)
    second.send_signal(signal.SIGKILL)  # no second save: one 3B checkpoint at a time fits the machine
    subprocess.run(["pkill", "-9", "-f", "sftjobs.trainer.entry"], check=False)
    second.wait()
    steps = [s for s, _ in logged(ck)]
    twice = sum(count - 1 for count in Counter(steps).values())
    timed = [(s, e) for s, e in logged(ck) if s > marker["step"] + 1 and e]
    per_step = None
    if len(timed) >= 3 and hms(timed[-1][1]) > hms(timed[0][1]):
        per_step = (hms(timed[-1][1]) - hms(timed[0][1])) / (timed[-1][0] - timed[0][0])
    result.update({"resumed": "resuming from" in (run.parent / "train2.log").read_text(errors="replace"),
                   "steps_trained_twice": twice,
                   "relaunch_to_first_step_s": round(first_new - relaunched, 1) if first_new else None,
                   "seconds_per_step": round(per_step, 3) if per_step else None})
    if per_step:
        result["before"] = {"lost_steps_mean": save_steps / 2, "lost_steps_worst": save_steps,
                            "lost_s_mean": round(save_steps / 2 * per_step), "lost_s_worst": round(save_steps * per_step)}
        result["after"] = {"lost_steps": twice, "lost_s": round(twice * per_step, 1), "save_s": result["save_s"]}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()

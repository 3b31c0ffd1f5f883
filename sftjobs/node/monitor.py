"""While a step trains: GPU utilisation and memory per GPU, the trainer's RSS and the checkpoint disk use,
one JSON line every few seconds into monitor/<step>-<host>.jsonl (status shows the latest line)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil

NVIDIA_QUERY = ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used,memory.total", "--format=csv,noheader,nounits"]


def gpu_samples() -> list[dict[str, Any]]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(NVIDIA_QUERY, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and all(p.replace(".", "").isdigit() for p in parts):
            gpus.append({"index": int(parts[0]), "util": float(parts[1]),
                         "mem_used_mib": float(parts[2]), "mem_total_mib": float(parts[3])})
    return gpus


def tree_rss_mb(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0.0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return round(total / 2**20, 1)


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class Sampler:
    """A daemon thread; ``with Sampler(...)`` around the training process."""

    def __init__(self, out_file: Path, pid: int, output_dir: Path, interval_s: float = 5.0):
        self.out_file = out_file
        self.pid = pid
        self.output_dir = output_dir
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sftjobs-sampler", daemon=True)

    def sample(self) -> dict[str, Any]:
        return {"time": round(time.time(), 1), "host": socket.gethostname(), "gpus": gpu_samples(),
                "rss_mb": tree_rss_mb(self.pid),
                "ckpt_bytes": dir_bytes(self.output_dir) if self.output_dir.exists() else 0}

    def _loop(self) -> None:
        self.out_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out_file, "a", encoding="utf-8") as handle:
            while True:
                handle.write(json.dumps(self.sample()) + "\n")
                handle.flush()
                if self._stop.wait(self.interval_s):
                    break

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def latest_sample(run_dir: Path, step: str) -> dict[str, Any] | None:
    """The newest line of any of the step's monitor files (one per node)."""
    newest = None
    for path in sorted((run_dir / "monitor").glob(f"{step}-*.jsonl")):
        try:
            with open(path, "rb") as handle:
                handle.seek(max(0, os.path.getsize(path) - 8192))
                lines = handle.read().decode(errors="replace").strip().splitlines()
            sample = json.loads(lines[-1]) if lines else None
        except (OSError, ValueError):
            continue
        if sample and (newest is None or sample.get("time", 0) > newest.get("time", 0)):
            newest = sample
    return newest

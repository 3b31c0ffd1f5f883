"""The monitor's files (monitor/<step>-<host>.jsonl, written on the node by sftjobs.node.monitor), read by status."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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

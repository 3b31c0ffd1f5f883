"""LLaMA-Factory's trainer_log.jsonl: read by validate, status and the dry run's time limit."""

from __future__ import annotations

import json
import os
from typing import Any


def read_trainer_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every JSON object line of LLaMA-Factory's trainer_log.jsonl (a torn last line is skipped)."""
    entries = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                value = json.loads(line)  # Python's json reads the NaN / Infinity LLaMA-Factory writes
            except ValueError:
                continue
            if isinstance(value, dict):
                entries.append(value)
    return entries

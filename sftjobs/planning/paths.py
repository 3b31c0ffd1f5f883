"""The absolute paths a run's files point at (relative profile paths resolve against the run store)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sftjobs.profile import Profile


def absolute(path: str, base: Path) -> str:
    """Relative profile paths resolve against base (the run store); rendered files carry absolute ones."""
    return os.path.normpath(os.path.join(str(base), os.path.expanduser(path)))


class RunPaths:
    """The absolute paths a run's files point at."""

    def __init__(self, profile: Profile, run_dir: Path, base: Path, run_id: str):
        v = profile.spec
        self.run_dir = str(run_dir)
        model = v.model
        self.model_dir = absolute(model.path if model.source == "path" else model.local_dir, base)
        self.data_dir = absolute(v.data.dir, base)
        # "{run_id}" in output_dir gives each run its own checkpoints (the demo); without it a new run into the
        # same output_dir resumes from what is there, as LLaMA-Factory does.
        self.output_dir = absolute(v.output_dir.replace("{run_id}", run_id), base)
        self.dry_run_output_dir = self.output_dir.rstrip("/") + "-dry-run"
        self.dataset_dir = os.path.join(self.run_dir, "dataset")
        self.deepspeed_config = os.path.join(self.run_dir, "deepspeed.json") if v.deepspeed != "none" else None
        self.datasets_cache = os.path.join(self.data_dir, ".hf_datasets_cache")
        self.tokenized_path = os.path.join(self.run_dir, "tokenized")
        self.data_path = absolute(v.data.path, base) if v.data.path else None

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

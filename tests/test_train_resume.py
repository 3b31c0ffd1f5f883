"""Which checkpoint a restarted training step resumes from: the newest complete one; a checkpoint that was
being written when the job died is moved aside (never deleted, never picked up)."""

import json
from pathlib import Path

from sftjobs.steps.train import llamafactory_command, newest_complete_checkpoint


def make_checkpoint(output: Path, step: int, complete: bool) -> Path:
    path = output / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"w" * 10)
    if complete:  # HF Trainer writes trainer_state.json last
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_newest_complete_checkpoint_skips_one_interrupted_mid_save(tmp_path):
    out = tmp_path / "ck"
    make_checkpoint(out, 50, True)
    make_checkpoint(out, 100, True)
    make_checkpoint(out, 150, False)  # the job died while this was being saved
    (out / "checkpoint-notanumber").mkdir()
    chosen = newest_complete_checkpoint(out, log=lambda *_: None)
    assert chosen == out / "checkpoint-100"
    assert not (out / "checkpoint-150").exists()
    aside = [p.name for p in out.iterdir() if p.name.startswith("incomplete-checkpoint-150")]
    assert len(aside) == 1 and (out / aside[0] / "model.safetensors").exists()  # kept, just out of the way
    assert llamafactory_command(Path("/r/train.yaml"), chosen)[-1] == f"resume_from_checkpoint={chosen}"


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert newest_complete_checkpoint(tmp_path / "missing", log=lambda *_: None) is None
    out = tmp_path / "ck"
    make_checkpoint(out, 10, False)
    assert newest_complete_checkpoint(out, log=lambda *_: None) is None
    assert not any(a.startswith("resume_from_checkpoint") for a in llamafactory_command(Path("/r/t.yaml"), None))

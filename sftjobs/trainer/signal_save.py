"""Save at the signal: a time limit's USR2 or a preemption's SIGTERM ends training with a complete checkpoint of
the step it was on, instead of losing everything since the last periodic save.

Inside every training process (torchrun worker): the signal only sets a flag. At the end of each optimizer step
the ranks agree on it (one all-reduce of a flag; a rank whose signal came later still stops at the same step,
and a save is collective under DeepSpeed). If any rank saw a signal, the Trainer saves a checkpoint of that step
(model, optimizer, scheduler, RNG; the step number is the data position resume skips to) through its own
``_save_checkpoint``, so the checkpoint is the same as a periodic one and trainer_state.json is still written last.
After the save every rank waits for the others, rank 0 writes the stop marker, and the processes exit 0 without
LLaMA-Factory's end-of-training save: the run is not finished, the requeued job resumes from that checkpoint.

transformers' own ``enable_jit_checkpoint`` is not used: it reacts to SIGTERM only, decides per rank (two ranks
that see the signal at different steps would save different steps, a hang under DeepSpeed), does not exist in
the older transformers sftjobs supports, and lets LLaMA-Factory write a final model into output_dir as if the
run were complete.

Every save's duration (periodic or at a signal) is appended to the save log, so a dry run measures what
``resources.signal_delay_s`` must cover.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


def keep_loader_workers_on_sigterm() -> None:
    """Data loader workers ignore SIGTERM. torch's worker handler exits on a SIGTERM that does not come from its
    parent, and Slurm sends a preemption's SIGTERM to every process of the job: the training process would then
    fail on a dead worker before it could save. The workers end when the training process does."""
    import transformers.trainer as hf_trainer

    original = hf_trainer.seed_worker

    def seed_worker(*args, **kwargs):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return original(*args, **kwargs)

    seed_worker.__wrapped__ = original  # type: ignore[attr-defined]
    hf_trainer.seed_worker = seed_worker


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _append(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _write_json(path: Path, record: dict[str, Any]) -> None:
    """Whole or not at all: the train step reads this marker to tell a stop at a signal from a finished run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class SignalSave(TrainerCallback):
    """The callback and the signal handlers of one training process."""

    def __init__(self, marker: Path | None, save_log: Path | None, log=print):
        self.marker = marker
        self.save_log = save_log
        self.log = log
        self.requested: str | None = None  # the first stop signal's name, set by the handler
        self.stopping = False
        self.save_started: float | None = None

    def install(self) -> None:
        """Handle the stop signals from now on (before the model loads: a signal during loading stops the run at
        its first step instead of killing it)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            # nothing else here: a handler runs between two bytecodes, maybe inside a collective or a save
            os.write(2, f"sftjobs: {self.requested} received: saving a checkpoint at the end of this optimizer "
                        "step, then stopping\n".encode())

    def _agreed(self) -> bool:
        """True on every rank when any rank saw a stop signal."""
        import torch
        import torch.distributed as dist

        local = self.requested is not None
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if not self.stopping and self._agreed():
            self.stopping = True
            control.should_save = True
            control.should_training_stop = True
        if control.should_save:
            self.save_started = time.monotonic()
        return control

    def on_save(self, args, state, control, **kwargs):
        seconds = time.monotonic() - self.save_started if self.save_started is not None else None
        self.save_started = None
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        reason = "signal" if self.stopping else "periodic"
        if _rank() == 0 and self.save_log is not None:
            _append(self.save_log, {"step": state.global_step, "seconds": seconds, "reason": reason,
                                    "checkpoint": str(checkpoint), "time": time.time()})
        if not self.stopping:
            return control
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's part of the checkpoint is written
        if _rank() == 0:
            if self.marker is not None:
                _write_json(self.marker, {"signal": self.requested or "another rank's", "step": state.global_step,
                                         "max_steps": state.max_steps, "checkpoint": str(checkpoint),
                                         "save_seconds": seconds, "time": time.time()})
            self.log(f"stopped on {self.requested or 'a signal'} at step {state.global_step}/{state.max_steps}: "
                     f"{checkpoint.name} saved in {seconds or 0:.1f} s; the requeued job resumes from it")
        for sig in STOP_SIGNALS:  # ignored, not default: Python's shutdown would let a repeated signal kill the exit
            signal.signal(sig, signal.SIG_IGN)
        raise SystemExit(0)

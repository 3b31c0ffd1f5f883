"""speed.manual_gc: Python's cyclic garbage collector off during training, one collection every N optimizer steps.

A training step allocates thousands of Python objects (tensors, autograd nodes, hook closures), so the automatic
collector runs many times a step, and now and then a full collection walks every object the process holds (the
model's modules and parameters, the tokenizer, the data loader). A launch-bound step (prod's, bench/README.md)
waits for that on its one CPU thread; with several GPUs the rank that collects makes the others wait at the next
collective. Megatron-LM (`--manual-gc`) and torchtitan (`gc_freq`) do the same: freeze what exists when training
starts (it lives to the end), disable the automatic collector, and collect at a fixed step interval on every rank
at once. Reference counting still frees everything that is not in a cycle at once; only cycles wait for the
interval. Nothing about what is computed changes.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

EVERY_STEPS = 50  # optimizer steps between collections (torchtitan's default gc_freq; Megatron's interval is a flag)


class ManualGC(TrainerCallback):
    """Automatic collection off from the start of training to its end; a full collection every ``every``
    optimizer steps and after each checkpoint save (whose temporaries are then freed at once)."""

    def __init__(self, every: int = EVERY_STEPS, log: Callable[[str], None] | None = None):
        if every < 1:
            raise ValueError(f"manual_gc: every must be >= 1 optimizer step, not {every}")
        self.every = every
        self.log = log
        self.collections = 0
        self._was_enabled: bool | None = None

    def _collect(self) -> None:
        gc.collect()
        self.collections += 1

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._was_enabled = gc.isenabled()
        self._collect()
        gc.freeze()  # what exists now (model, optimizer, data) is never scanned again
        gc.disable()
        if self.log:
            self.log(f"speed.manual_gc on: automatic garbage collection off, a collection every {self.every} "
                     f"optimizer steps ({gc.get_freeze_count()} objects frozen)")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.every == 0:
            self._collect()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._collect()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        gc.unfreeze()
        if self._was_enabled:
            gc.enable()
        self._collect()

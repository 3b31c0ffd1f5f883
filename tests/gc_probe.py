"""A TrainerCallback factory for the entry's --callback hook (tests/test_lf_train.py): it records, per optimizer
step, whether Python's automatic garbage collection is on and how many collections ran since training began,
and writes them to $GC_PROBE_OUT at the end of training."""

from __future__ import annotations

import gc
import json
import os

from transformers import TrainerCallback


class GCProbe(TrainerCallback):
    def __init__(self) -> None:
        self.collections = 0
        self.steps: list[dict] = []

    def _count(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.collections += 1

    def on_train_begin(self, args, state, control, **kwargs):
        gc.callbacks.append(self._count)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append({"step": state.global_step, "gc_enabled": gc.isenabled(), "collections": self.collections})

    def on_train_end(self, args, state, control, **kwargs):
        gc.callbacks.remove(self._count)
        record = {"steps": self.steps, "gc_enabled_at_end": gc.isenabled()}
        with open(os.environ["GC_PROBE_OUT"], "w", encoding="utf-8") as out:
            json.dump(record, out)


def callbacks() -> GCProbe:
    return GCProbe()

"""speed.manual_gc's callback (sftjobs/trainer/manual_gc.py) on the Trainer's events: the automatic collector off
from the start of training to its end, a full collection every N optimizer steps and after each save, what was
there before training frozen, and the collector's state put back at the end. Through the real LLaMA-Factory:
tests/test_lf_train.py."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest

from sftjobs.trainer.manual_gc import EVERY_STEPS, ManualGC


@pytest.fixture()
def collections():
    """Full collections that run while the test does, as a list of generation numbers."""
    seen: list[int] = []

    def count(phase, info):
        if phase == "start":
            seen.append(info["generation"])

    was_enabled = gc.isenabled()
    gc.callbacks.append(count)
    yield seen
    gc.callbacks.remove(count)
    gc.unfreeze()
    (gc.enable if was_enabled else gc.disable)()


def test_the_collector_is_off_between_the_intervals_and_back_on_at_the_end(collections):
    gc.enable()
    lines = []
    callback = ManualGC(every=3, log=lines.append)
    state = SimpleNamespace(global_step=0)
    callback.on_train_begin(None, state, None)
    assert not gc.isenabled() and gc.get_freeze_count() > 0
    assert collections == [2] and "a collection every 3 optimizer steps" in lines[0]
    garbage_at = []
    for step in range(1, 8):
        state.global_step = step
        for _ in range(5000):  # cycles the automatic collector would have collected within the step
            cycle = []
            cycle.append(cycle)
        del cycle
        callback.on_step_end(None, state, None)
        garbage_at.append(len(collections))
    # one full collection at steps 3 and 6, none between them
    assert garbage_at == [1, 1, 2, 2, 2, 3, 3]
    assert set(collections) == {2}
    callback.on_save(None, state, None)
    assert len(collections) == 4
    callback.on_train_end(None, state, None)
    assert gc.isenabled() and gc.get_freeze_count() == 0 and callback.collections == 5


def test_a_collector_that_was_off_stays_off(collections):
    gc.disable()
    callback = ManualGC()
    callback.on_train_begin(None, SimpleNamespace(global_step=0), None)
    callback.on_train_end(None, SimpleNamespace(global_step=1), None)
    assert not gc.isenabled() and callback.every == EVERY_STEPS


def test_the_interval_is_at_least_one_step():
    with pytest.raises(ValueError, match="every must be >= 1"):
        ManualGC(every=0)

"""The length-balanced order: every optimizer step keeps exactly its samples; only the GPU that computes each
one changes, and the slowest GPU of a step gets less to do."""

import random

import pytest

from sftjobs.trainer import sampler as rb


def lognormal_lengths(n, seed=0):
    rng = random.Random(seed)
    return [min(15000, max(64, int(rng.lognormvariate(8.0, 0.7)))) for _ in range(n)]


@pytest.mark.parametrize("layout", rb.LAYOUTS)
@pytest.mark.parametrize("world,per_device,accum", [(8, 1, 2), (4, 1, 4), (2, 2, 2), (1, 1, 4), (3, 2, 1)])
def test_each_step_keeps_its_samples(layout, world, per_device, accum):
    lengths = lognormal_lengths(1003)
    base = list(range(len(lengths)))
    random.Random(1).shuffle(base)
    order = list(rb.balanced_order(base, lengths, world, per_device, accum, layout))
    chunk = world * per_device * accum
    assert sorted(order) == sorted(base)
    full = len(base) - len(base) % chunk
    for start in range(0, full, chunk):
        assert set(order[start:start + chunk]) == set(base[start:start + chunk])
    assert order[full:] == base[full:]  # a last partial step keeps the trainer's order


WORLD, PER_DEVICE, ACCUM = 8, 1, 2  # the plan's 8-GPU prod step


def shuffled_and_balanced(layout, seed):
    """Lengths, the trainer's shuffled order, the balanced order, and the per-step loads of both."""
    lengths = lognormal_lengths(1600, seed=seed)
    base = list(range(len(lengths)))
    random.Random(seed + 1).shuffle(base)
    order = list(rb.balanced_order(base, lengths, WORLD, PER_DEVICE, ACCUM, layout))
    loads = [rb.step_loads(o, lengths, WORLD, PER_DEVICE, ACCUM) for o in (base, order)]
    return lengths, base, order, *loads


def test_rounds_layout_puts_similar_lengths_in_one_micro_step():
    _, _, _, before, after = shuffled_and_balanced("rounds", seed=2)
    for b, a in zip(before, after, strict=True):
        # sorted rounds minimise the sum of the micro-steps' longest samples: never worse, step by step
        assert sum(a["micro_longest"]) <= sum(b["micro_longest"])
        assert a["micro_longest"] == sorted(a["micro_longest"], reverse=True)
    gain = sum(sum(s["micro_longest"]) for s in before) / sum(sum(s["micro_longest"]) for s in after)
    assert gain > 1.15, gain


def test_ranks_layout_evens_out_per_rank_totals():
    lengths, base, order, before, after = shuffled_and_balanced("ranks", seed=4)
    mean_max = lambda loads: sum(max(s["rank_tokens"]) for s in loads) / len(loads)  # noqa: E731
    assert mean_max(before) / mean_max(after) > 1.15
    summary = rb.summary(base, order, lengths, WORLD, PER_DEVICE, ACCUM)
    assert summary["steps"] == 100 and summary["max_rank_tokens_after"] < summary["max_rank_tokens_before"]


def test_every_rank_gets_its_share_of_samples():
    lengths = [1] * 7 + [10_000]  # one huge sample must not pull extra samples to the other ranks' side
    for layout in rb.LAYOUTS:
        order = rb.balance_chunk(list(range(8)), lengths, world=2, per_device=2, accum=2, layout=layout)
        loads = rb.step_loads(order, lengths, 2, 2, 2)[0]
        assert len(order) == 8 and sorted(order) == list(range(8))
        assert sorted(loads["rank_tokens"]) == [4, 10_003]  # 4 samples each, the huge one among them


def test_layout_follows_how_gradients_are_synchronised():
    assert rb.layout_for_zero_stage(3) == "rounds" and rb.layout_for_zero_stage(2) == "rounds"
    assert rb.layout_for_zero_stage(1) == "ranks" and rb.layout_for_zero_stage(None) == "ranks"


def test_a_wrong_chunk_size_is_refused():
    with pytest.raises(ValueError):
        rb.balance_chunk([0, 1, 2], [1, 2, 3], world=2, per_device=1, accum=2)
    with pytest.raises(ValueError):
        rb.balance_chunk([0, 1], [1, 2], world=2, per_device=1, accum=1, layout="zigzag")


# ----------------------------------------------------------------------------- packs (speed.pack_rank_samples)


@pytest.mark.parametrize("layout", rb.LAYOUTS)
@pytest.mark.parametrize("world,accum", [(8, 2), (4, 2), (4, 4), (2, 8), (1, 4)])
def test_packs_keep_each_steps_samples_within_capacity(layout, world, accum):
    lengths = lognormal_lengths(1003)
    capacity = max(lengths)
    base = list(range(len(lengths)))
    random.Random(2).shuffle(base)
    packs = list(rb.packed_order(base, lengths, world, accum, capacity, layout, attention_span=20000))
    chunk = world * accum
    assert len(packs) == len(base)  # one pack per position: the trainer's step count is unchanged
    full = len(base) - len(base) % chunk
    for start in range(0, full, chunk):
        step = packs[start:start + chunk]
        members = [i for pack in step if pack != rb.IDLE_PACK for i in pack]
        assert sorted(members) == sorted(base[start:start + chunk])
        assert all(sum(lengths[i] for i in pack) <= capacity for pack in step if pack != rb.IDLE_PACK)
        # a micro-step is idle on every rank or on none, idle ones lead, and the last (synchronising) never is
        idle = [[step[m * world + r] == rb.IDLE_PACK for r in range(world)] for m in range(accum)]
        assert all(len(set(row)) == 1 for row in idle)
        flags = [row[0] for row in idle]
        assert flags == sorted(flags, reverse=True) and not flags[-1]
    assert packs[full:] == [(i,) for i in base[full:]]


def test_packs_beat_one_sample_per_micro_step():
    """8 GPUs x ga 2 (the plan's step) and 4 x 4: the slowest GPU's cost falls, towards the bound that the
    longest sample of a step sets; some packs are empty (one GPU took a long sample alone)."""
    lengths = lognormal_lengths(3200, seed=5)
    base = list(range(len(lengths)))
    random.Random(6).shuffle(base)
    for world, accum in ((8, 2), (4, 4)):
        balanced = [(i,) for i in rb.balanced_order(base, lengths, world, 1, accum, "ranks")]
        packs = list(rb.packed_order(base, lengths, world, accum, max(lengths), "ranks", 20000))
        one = rb.pack_summary(base, balanced, lengths, world, accum, 20000)
        packed = rb.pack_summary(base, packs, lengths, world, accum, 20000)
        assert packed["slowest_over_mean_after"] < one["slowest_over_mean_after"] - 0.03, (world, one, packed)
        assert packed["empty_packs_per_step"] > 0
        # nearly every step has a micro-step with nothing to compute on any GPU (skip_idle_micro_steps)
        assert packed["idle_micro_steps_per_step"] >= 0.9, packed


@pytest.mark.parametrize("layout", rb.LAYOUTS)
def test_each_ranks_packs_run_smallest_first_and_shared_empty_micro_steps_are_idle(layout):
    lengths = [9000, 5000, 4000, 3000, 800, 700, 600, 500]
    packs = rb.pack_chunk(range(8), lengths, world=2, accum=4, capacity=9000, layout=layout)
    assert packs[:4] == [rb.IDLE_PACK] * 4  # micro-steps 0 and 1: empty on both ranks
    sizes = [[sum(lengths[i] for i in packs[m * 2 + r] if i is not None) for m in range(4)] for r in range(2)]
    assert all(s == sorted(s) for s in sizes), sizes
    assert sorted(sum(s) for s in sizes) == [11600, 12000]  # LPT: 9000 + 3000 | 5000 + 4000 + the four short


def test_a_micro_step_empty_on_one_rank_only_is_not_idle():
    lengths = [5000, 2000, 1900, 1800]  # rank 0: 5000 | nothing; rank 1: 2000 + 1900 | 1800 (capacity 5000)
    packs = rb.pack_chunk(range(4), lengths, world=2, accum=2, capacity=5000)
    assert packs == [(), (3,), (0,), (1, 2)]
    assert rb.IDLE_PACK not in packs
    assert () in packs  # an empty pack on one rank still trains (a one-token row): the other rank computes


def test_packs_fall_back_to_one_sample_each_when_they_cannot_fit():
    lengths = [10, 10, 10, 10]
    packs = rb.pack_chunk(range(4), lengths, world=2, accum=2, capacity=5)  # capacity below every sample
    assert sorted(packs) == [(0,), (1,), (2,), (3,)]


def test_merged_rows_restart_positions_and_empty_packs_carry_no_labels():
    from sftjobs.trainer.entry import merge_rows

    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7], "images": None},
            {"input_ids": [8, 9], "attention_mask": [1, 1], "labels": [-100, 9]}]
    merged = merge_rows(rows, pad_id=0)
    assert merged == {"input_ids": [5, 6, 7, 8, 9], "attention_mask": [1] * 5, "labels": [-100, 6, 7, -100, 9],
                      "position_ids": [0, 1, 2, 0, 1]}
    assert merge_rows([], pad_id=0) == {"input_ids": [0], "attention_mask": [1], "labels": [-100], "position_ids": [0]}
    with pytest.raises(RuntimeError, match="text data"):
        merge_rows([{**rows[0], "images": ["a.png"]}], pad_id=0)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_split_halves_go_to_a_rank_pair_in_its_last_micro_step(world):
    """speed.split_long_samples: every sample of a step is trained once, whole or as both halves; the halves sit
    first in the last micro-step of ranks 2p and 2p+1; idle micro-steps stay all-or-none and never last."""
    lengths = lognormal_lengths(800, seed=3)
    base = list(range(len(lengths)))
    random.Random(4).shuffle(base)
    accum = 2
    chunk = world * accum
    packs = list(rb.packed_order(base, lengths, world, accum, max(lengths), "rounds", 20000, split=True))
    split_steps = 0
    for start in range(0, len(base) - len(base) % chunk, chunk):
        step = packs[start:start + chunk]
        whole = [e for pack in step if pack != rb.IDLE_PACK for e in pack if not isinstance(e, rb.Half)]
        halves = [(pos, e) for pos, pack in enumerate(step) if pack != rb.IDLE_PACK
                  for e in pack if isinstance(e, rb.Half)]
        assert sorted(whole + [e.index for _, e in halves if e.half == 0]) == sorted(base[start:start + chunk])
        for pos, entry in halves:
            micro, rank = divmod(pos, world)
            assert micro == accum - 1 and rank % 2 == entry.half and step[pos][0] == entry
            partner = step[micro * world + (rank ^ 1)]
            assert partner[0] == rb.Half(entry.index, 1 - entry.half)
        split_steps += bool(halves)
        idle = [step[m * world] == rb.IDLE_PACK for m in range(accum)]
        assert all((step[m * world + r] == rb.IDLE_PACK) == idle[m] for m in range(accum) for r in range(world))
        assert not idle[-1]
    assert split_steps > 0


def test_splitting_lowers_the_slowest_rank_and_only_where_a_sample_exceeds_a_share():
    lengths = lognormal_lengths(3200, seed=5)
    base = list(range(len(lengths)))
    for world in (4, 8):
        kept = rb.pack_summary(base, list(rb.packed_order(base, lengths, world, 2, max(lengths), "rounds", 20000)),
                               lengths, world, 2, 20000)
        split = rb.pack_summary(base, list(rb.packed_order(base, lengths, world, 2, max(lengths), "rounds", 20000,
                                                           split=True)), lengths, world, 2, 20000)
        assert kept["split_samples_per_step"] == 0 and split["split_samples_per_step"] > 0.5, split
        assert split["slowest_over_mean_after"] < kept["slowest_over_mean_after"] - 0.15, (world, kept, split)
    even = [1000] * 8  # no sample costs more than a rank's share: nothing is split
    assert not any(isinstance(e, rb.Half) for p in rb.pack_chunk(range(8), even, 4, 2, 1000, split=True) for e in p)

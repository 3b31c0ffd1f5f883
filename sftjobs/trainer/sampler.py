"""Length-balanced order for distributed training: the same samples per optimizer step, spread over the GPUs
so that no GPU waits long for the one with the longest sample.

HF Trainer + accelerate hand out a sampler's order in batches of ``per_device`` samples, round-robin over the
ranks: within one optimizer step (``chunk = world x per_device x accum`` consecutive positions), micro-step m
of rank r reads positions ``(m * world + r) * per_device ...``. With bs 1 and samples of very different lengths
(ARPO: median ~3K tokens, tail to 15K), a random order makes every rank wait for the longest sample of each
micro-step. Reordering *inside* a chunk changes which GPU computes which sample, never which samples form a
step, so the step's summed gradient (and what the model learns) is unchanged.

Two layouts, for the two ways gradients are synchronised:
  rounds  ZeRO-2/3 reduce gradients after every micro-step, so each micro-step should hold samples of similar
          length: sort the chunk, micro-step 0 gets the longest ``world x per_device``, and so on. Ranks are
          filled in a snake order across micro-steps, which also evens out the per-rank totals.
  ranks   ZeRO-0/1 and DDP synchronise once per optimizer step (accelerate's no_sync during accumulation), so
          only each rank's total matters: longest-first to the least loaded rank that still has room.

Lengths are token counts; the attention part of the cost grows faster than that, so balance is approximate.

Packed (``pack_chunk``, speed.pack_rank_samples): with bs 1 every rank still computes ``accum`` samples per step,
so one long sample sets the pace (8 GPUs x 2 samples of ARPO-like lengths: the slowest rank carries 1.7x the mean).
Instead, the step's ``world x accum`` samples are dealt as ``world x accum`` *packs*: a pack holds any number of
the step's samples (up to ``capacity`` tokens, the one-row memory budget), is trained as one row with attention
kept inside each sample, and may be empty (a one-token row without labels). A rank can then take the longest
sample alone while another takes four short ones. The samples of every step, and the loss (the sum over the
step's supervised tokens divided by their number), stay those of the unpacked run.

Each rank's packs run smallest first, so a micro-step whose packs are empty on every rank comes before the
step's last (synchronising) micro-step; pack_chunk marks it IDLE_PACK on every rank. At 2 samples per GPU that
is one micro-step of every step (the greedy fits a GPU's samples into one pack). Trained, it is a one-token row
without labels; with speed.skip_idle_micro_steps the trainer skips it on every rank at once, so no rank waits
in a collective the others never reach.

Split (speed.split_long_samples): whole samples cannot beat the longest one, so while a step's longest sample
costs more than the mean rank's share, it is split over a pair of ranks (2p, 2p+1), half each in their last
micro-step (``Half`` entries; split_attention.py computes its attention across the pair), at most one per pair.
The other samples are then dealt as above around the halves.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from sftjobs.trainer.attention.split import half_length

LAYOUTS = ("rounds", "ranks")
SPLIT_MIN_TOKENS = 16  # shorter samples are never split (each of the four chunks keeps a few tokens)
# A micro-step with nothing to compute on any rank (not a dataset index: PackedRows turns it into a row)
IDLE_PACK: tuple = (None,)


class Half(NamedTuple):
    """A pack entry: one half of sample ``index``, split over a rank pair (split_attention.half_chunks)."""
    index: int
    half: int


def layout_for_zero_stage(stage: int | None) -> str:
    """ZeRO-2/3 reduce every micro-step; ZeRO-0/1, DDP and single-GPU runs once per optimizer step."""
    return "rounds" if stage is not None and stage >= 2 else "ranks"


def _place(assignment: list[list[list[int]]], world: int, per_device: int, accum: int) -> list[int]:
    """assignment[rank][micro] = per_device indices -> positions in the order accelerate deals them out."""
    order = [0] * (world * per_device * accum)
    for rank in range(world):
        for micro in range(accum):
            for k, index in enumerate(assignment[rank][micro]):
                order[(micro * world + rank) * per_device + k] = index
    return order


def balance_chunk(indices: Sequence[int], lengths: Sequence[int], world: int, per_device: int, accum: int,
                  layout: str = "rounds") -> list[int]:
    """A permutation of ``indices`` (one optimizer step's samples) in the order the sampler should yield."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if len(indices) != world * per_device * accum:
        raise ValueError(f"a chunk holds world x per_device x accum = {world * per_device * accum} samples, "
                         f"not {len(indices)}")
    # longest first; the index breaks ties so the result does not depend on the input order's accidents
    ranked = sorted(indices, key=lambda i: (-lengths[i], i))
    assignment: list[list[list[int]]] = [[[] for _ in range(accum)] for _ in range(world)]
    if layout == "rounds":
        per_round = world * per_device
        for micro in range(accum):
            block = ranked[micro * per_round:(micro + 1) * per_round]
            ranks = range(world) if micro % 2 == 0 else range(world - 1, -1, -1)
            for slot, rank in enumerate(ranks):  # consecutive sorted samples share a batch: least padding
                assignment[rank][micro] = block[slot * per_device:(slot + 1) * per_device]
    else:
        capacity = per_device * accum
        heap = [(0, rank) for rank in range(world)]  # (tokens so far, rank)
        filled: list[list[int]] = [[] for _ in range(world)]
        for index in ranked:
            load, rank = heapq.heappop(heap)
            filled[rank].append(index)
            if len(filled[rank]) < capacity:
                heapq.heappush(heap, (load + lengths[index], rank))
        for rank in range(world):
            mine = filled[rank]  # already longest first: consecutive ones share a micro-batch
            assignment[rank] = [mine[m * per_device:(m + 1) * per_device] for m in range(accum)]
    return _place(assignment, world, per_device, accum)


def sample_cost(length: int, attention_span: float | None = None) -> float:
    """Relative compute of one sample: linear in its tokens, plus causal attention (quadratic) where the model's
    attention_span (the length at which attention costs as much as the rest) is known."""
    return length + (length * length / attention_span if attention_span else 0.0)


def entry_tokens(entry, lengths: Sequence[int]) -> int:
    """Tokens of a pack entry: a sample index, or a Half of one."""
    return half_length(lengths[entry.index], entry.half) if isinstance(entry, Half) else lengths[entry]


def entry_cost(entry, lengths: Sequence[int], attention_span: float | None = None) -> float:
    if isinstance(entry, Half):
        return sample_cost(lengths[entry.index], attention_span) / 2
    return sample_cost(lengths[entry], attention_span)


def pack_chunk(indices: Sequence[int], lengths: Sequence[int], world: int, accum: int, capacity: int,
               layout: str = "ranks", attention_span: float | None = None, split: bool = False) -> list[tuple]:
    """One optimizer step's samples as ``world x accum`` packs, in the order accelerate deals them out (bs 1).

    Longest first, each sample goes to the least loaded rank (by ``sample_cost``) that has a pack with room, into
    that rank's fullest pack where it fits. Each rank's packs are then ordered smallest first, so micro-step m
    holds every rank's m-th smallest (with ``layout`` rounds, ZeRO-2/3's sync after every micro-step waits for
    similar packs) and micro-steps empty on every rank come first: those are IDLE_PACK on every rank. Where the
    greedy cannot place a sample, the chunk falls back to one sample per pack (``balance_chunk``).

    With ``split``, first, while the longest remaining sample costs more than the mean rank's share (and a pair
    is free), its two halves go to ranks 2p and 2p+1, first in their last micro-step's pack (which stays last)."""
    if len(indices) != world * accum:
        raise ValueError(f"a chunk holds world x accum = {world * accum} samples, not {len(indices)}")
    ranked = sorted(indices, key=lambda i: (-lengths[i], i))
    packs: list[list[list]] = [[[] for _ in range(accum)] for _ in range(world)]
    room = [[capacity] * accum for _ in range(world)]
    load = [0.0] * world
    share = sum(sample_cost(lengths[i], attention_span) for i in indices) / world
    pairs = world // 2 if split else 0
    for pair in range(pairs):
        index = ranked[0]
        if lengths[index] < SPLIT_MIN_TOKENS or sample_cost(lengths[index], attention_span) <= share:
            break
        ranked.pop(0)
        for half in (0, 1):
            rank = 2 * pair + half
            packs[rank][accum - 1].append(Half(index, half))
            room[rank][accum - 1] -= half_length(lengths[index], half)
            load[rank] += entry_cost(Half(index, half), lengths, attention_span)
    for index in ranked:
        length = lengths[index]
        for rank in sorted(range(world), key=lambda r: (load[r], r)):
            fits = [m for m in range(accum) if room[rank][m] >= length]
            if fits:
                micro = min(fits, key=lambda m: (room[rank][m], m))
                packs[rank][micro].append(index)
                room[rank][micro] -= length
                load[rank] += sample_cost(length, attention_span)
                break
        else:
            return [(i,) for i in balance_chunk(indices, lengths, world, 1, accum, layout)]
    for rank in range(world):
        last = packs[rank][accum - 1]
        movable = accum - 1 if last and isinstance(last[0], Half) else accum  # a pair's micro-step stays last
        packs[rank][:movable] = sorted(packs[rank][:movable], key=lambda p: sum(entry_tokens(e, lengths) for e in p))
    idle = [all(not packs[rank][micro] for rank in range(world)) for micro in range(accum)]
    order: list[tuple] = [()] * (world * accum)
    for rank in range(world):
        for micro in range(accum):
            order[micro * world + rank] = IDLE_PACK if idle[micro] else tuple(packs[rank][micro])
    return order


def packed_order(base: Sequence[int], lengths: Sequence[int], world: int, accum: int, capacity: int,
                 layout: str = "ranks", attention_span: float | None = None, split: bool = False
                 ) -> Iterator[tuple]:
    """``base`` (the trainer's random order) as packs, one full optimizer step at a time; a last partial step
    keeps its base order, one sample per pack."""
    chunk = world * accum
    full = len(base) - len(base) % chunk
    for start in range(0, full, chunk):
        yield from pack_chunk(base[start:start + chunk], lengths, world, accum, capacity, layout, attention_span,
                              split)
    yield from ((i,) for i in base[full:])


def pack_summary(base: Sequence[int], packs: Sequence[tuple[int, ...]], lengths: Sequence[int], world: int,
                 accum: int, attention_span: float | None = None) -> dict[str, float]:
    """Mean over optimizer steps of the slowest rank's cost (sample_cost, summed over its micro-steps) against
    the mean rank's, for the trainer's order (one sample per micro-step) and for the packs; and empty packs per
    step (one-token rows)."""
    chunk = world * accum

    def ratio(groups: Sequence[tuple[int, ...]]) -> float:
        slowest = mean = 0.0
        for start in range(0, len(groups) - len(groups) % chunk, chunk):
            totals = [0.0] * world
            for pos, group in enumerate(groups[start:start + chunk]):
                totals[pos % world] += sum(entry_cost(e, lengths, attention_span) for e in group if e is not None)
            slowest, mean = slowest + max(totals), mean + sum(totals) / world
        return round(slowest / mean, 3) if mean else 1.0

    steps = len(base) // chunk
    empty = sum(1 for p in packs[:steps * chunk] if not p or p == IDLE_PACK)
    idle = sum(1 for p in packs[:steps * chunk] if p == IDLE_PACK) / world
    halves = sum(1 for p in packs[:steps * chunk] for e in p if isinstance(e, Half))
    return {"steps": steps, "slowest_over_mean_before": ratio([(i,) for i in base]),
            "slowest_over_mean_after": ratio(packs), "empty_packs_per_step": round(empty / steps, 2) if steps else 0,
            "idle_micro_steps_per_step": round(idle / steps, 2) if steps else 0,
            "split_samples_per_step": round(halves / 2 / steps, 2) if steps else 0}


def balanced_order(base: Sequence[int], lengths: Sequence[int], world: int, per_device: int, accum: int,
                   layout: str = "rounds") -> Iterator[int]:
    """``base`` (the random order the trainer would use) reordered inside each full optimizer step; a last
    partial step keeps its base order."""
    chunk = world * per_device * accum
    full = len(base) - len(base) % chunk
    for start in range(0, full, chunk):
        yield from balance_chunk(base[start:start + chunk], lengths, world, per_device, accum, layout)
    yield from base[full:]


def step_loads(order: Sequence[int], lengths: Sequence[int], world: int, per_device: int, accum: int
               ) -> list[dict[str, list[int]]]:
    """Per optimizer step: the tokens each rank computes in total and the longest sample of each micro-step
    (what the slowest rank costs under per-step and per-micro-step synchronisation)."""
    chunk = world * per_device * accum
    steps = []
    for start in range(0, len(order) - len(order) % chunk, chunk):
        part = order[start:start + chunk]
        totals = [0] * world
        longest = [0] * accum
        for pos, index in enumerate(part):
            batch = pos // per_device
            micro, rank = divmod(batch, world)
            totals[rank] += lengths[index]
            longest[micro] = max(longest[micro], lengths[index])
        steps.append({"rank_tokens": totals, "micro_longest": longest})
    return steps


def summary(base: Sequence[int], order: Sequence[int], lengths: Sequence[int], world: int, per_device: int,
            accum: int) -> dict[str, float]:
    """Mean over optimizer steps of what the slowest GPU computes, for the trainer's order and the balanced one:
    the largest per-rank token total (one synchronisation per step) and the sum of each micro-step's longest
    sample (ZeRO-2/3: one per micro-step)."""
    def means(seq: Sequence[int]) -> tuple[float, float]:
        loads = step_loads(seq, lengths, world, per_device, accum)
        if not loads:
            return 0.0, 0.0
        return (sum(max(s["rank_tokens"]) for s in loads) / len(loads),
                sum(sum(s["micro_longest"]) for s in loads) / len(loads))
    (base_rank, base_micro), (bal_rank, bal_micro) = means(base), means(order)
    return {"steps": len(base) // (world * per_device * accum), "max_rank_tokens_before": round(base_rank, 1),
            "max_rank_tokens_after": round(bal_rank, 1), "micro_longest_sum_before": round(base_micro, 1),
            "micro_longest_sum_after": round(bal_micro, 1)}

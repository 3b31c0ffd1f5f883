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
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence

LAYOUTS = ("rounds", "ranks")


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

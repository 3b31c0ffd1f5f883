"""Causal attention of one sample split over two GPUs (speed.split_long_samples), for the packed rows of
rank_balance.pack_chunk.

With 2 samples per GPU per step, the GPU that gets a step's longest sample sets the pace (bench/results: the
slowest GPU carries 1.3x the mean at 4x2, 1.6x at 8x2, even with the best whole-sample dealing). The packer may
instead give that sample to a pair of GPUs (ranks 2p and 2p+1), half each, in the same micro-step. The sample
is cut into four chunks c0 c1 c2 c3; half 0 holds c0 and c3, half 1 holds c1 and c2, so both halves do the same
attention work under the causal mask. Everything but attention works per token, so each half runs through the
model like any other row (positions are the sample's own, so the rotary embeddings are unchanged). In each
attention layer the pair all-gathers the half's keys and values (with grouped-query attention, 2 of 16 heads for
Qwen2.5-3B: ~15 MB per layer for a 15000-token sample) and each chunk's queries attend to the sample's keys up
to their own positions. The backward sums the key/value gradients over the pair. The outputs, the loss and the
gradients are the unsplit sample's (tests/test_split_attention.py, tests/test_lf_train.py).

Labels: the model predicts token p+1 at position p, and a half's chunk may end where the other GPU's chunk
begins, so lf_train builds the half's row with each position's target already in the next label slot
(``half_row``); the targets of the whole sample are each counted once over the pair.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100  # LLaMA-Factory's and transformers' label for "no loss here"
# the micro-step's split half on this rank (set by lf_train around one training step), else None
CURRENT: SplitHalf | None = None
GROUPS: dict[int, Any] = {}  # pair index p -> the process group of ranks 2p and 2p+1


@dataclass(frozen=True)
class SplitHalf:
    length: int  # tokens of the whole sample
    half: int  # 0: chunks c0 and c3; 1: chunks c1 and c2
    group: Any = None  # the pair's process group


def chunk_bounds(length: int) -> list[int]:
    """Positions [0, b1, b2, b3, length] of the four chunks; the two halves differ by at most one token."""
    quarter, extra = divmod(length, 4)
    sizes = [quarter + (extra > 0), quarter + (extra > 2), quarter + (extra > 1), quarter]
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return bounds


def half_chunks(length: int, half: int) -> list[tuple[int, int]]:
    """The sample positions (start, end) a half holds, in row order."""
    b = chunk_bounds(length)
    return [(b[0], b[1]), (b[3], b[4])] if half == 0 else [(b[1], b[2]), (b[2], b[3])]


def half_length(length: int, half: int) -> int:
    return sum(end - start for start, end in half_chunks(length, half))


def half_row(input_ids: list[int], labels: list[int], half: int) -> dict[str, list[int]]:
    """One half of a tokenized sample as row fields, labels in target form: the label slot after each position
    holds that position's target (the sample's next label), slot 0 is ignored, and ``last_target`` is the target
    of the half's last position (the caller puts it in the slot that follows)."""
    length = len(input_ids)
    targets = labels[1:] + [IGNORE_INDEX]
    ids: list[int] = []
    positions: list[int] = []
    row_targets: list[int] = []
    for start, end in half_chunks(length, half):
        ids += input_ids[start:end]
        positions += range(start, end)
        row_targets += targets[start:end]
    return {"input_ids": ids, "position_ids": positions, "labels": [IGNORE_INDEX] + row_targets[:-1],
            "last_target": row_targets[-1]}


def make_pair_groups(world: int) -> dict[int, Any]:
    """One process group per pair of ranks (2p, 2p+1); every rank must call this, in the same order."""
    import torch.distributed as dist

    if not GROUPS:
        for pair in range(world // 2):
            GROUPS[pair] = dist.new_group([2 * pair, 2 * pair + 1])
    return GROUPS


@functools.lru_cache(maxsize=1)
def _gather_class():
    import torch
    import torch.distributed as dist

    class PairGather(torch.autograd.Function):
        """[the pair's two tensors] from this rank's; backward: the gradients summed over the pair, own slot."""

        @staticmethod
        def forward(ctx, tensor, group, slot):
            ctx.group, ctx.slot = group, slot
            parts = [torch.empty_like(tensor) for _ in range(2)]
            dist.all_gather(parts, tensor.contiguous(), group=group)
            return torch.stack(parts)

        @staticmethod
        def backward(ctx, grad):
            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.group)
            return grad[ctx.slot], None, None

    return PairGather


def pair_gather(tensor, group, slot):
    return _gather_class().apply(tensor, group, slot)


def split_attention(query, key, value, split: SplitHalf, scaling=None):
    """q [1, H, n, D], k/v [1, Hkv, n, D] of this rank's half (n tokens, its chunks in row order) -> out
    [1, n, H, D]: each chunk's queries against the whole sample's keys up to their positions."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    length, half = split.length, split.half
    heads_kv = key.shape[1]
    widest = max(half_length(length, 0), half_length(length, 1))
    mine = torch.cat([key, value], dim=1)
    mine = F.pad(mine, (0, 0, 0, widest - mine.shape[2]))
    both = pair_gather(mine, split.group, half)  # [2, 1, 2 Hkv, widest, D]
    pieces = []  # (sample start, tensor)
    for h in (0, 1):
        offset = 0
        for start, end in half_chunks(length, h):
            pieces.append((start, both[h][:, :, offset:offset + end - start]))
            offset += end - start
    whole = torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])], dim=2)
    keys, values = whole[:, :heads_kv], whole[:, heads_kv:]
    outs = []
    offset = 0
    for start, end in half_chunks(length, half):
        q = query[:, :, offset:offset + end - start]
        k, v = keys[:, :, :end], values[:, :, :end]
        if start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        else:  # queries are the last (end - start) of `end` keys: causal aligned to the lower right
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(end - start, end),
                                                 scale=scaling, enable_gqa=True)
        outs.append(out)
        offset += end - start
    return torch.cat(outs, dim=2).transpose(1, 2)

"""Sample-isolated attention for packed rows without flash-attn: one causal attention per sample.

LLaMA-Factory's neat_packing keeps samples apart either with flash-attn's varlen kernel (position ids restart
per sample, no mask) or, where flash-attn is missing, with a 4D block-diagonal mask that makes SDPA compute the
whole cutoff_len^2 score matrix per layer (26 ms vs 3 ms per layer for a 15000-token pack of 4 samples on an
H100, bench/results). This registers an attention function that does what the varlen kernel does: it finds
the sample boundaries where position_ids restart and attends causally within each sample only.

Each sample of SHORT_SAMPLE tokens or more gets one call of SDPA's causal kernel. On CUDA with torch >= 2.10,
runs of consecutive shorter samples go through one call of torch's flash varlen kernel
(torch.nn.attention.varlen) instead; elsewhere (the CPU, older torch) every sample gets its SDPA call. Both
compute the same thing (tests/test_per_sample_attention_gpu.py compares them on a GPU, outputs and gradients).
With CUDNN_BUCKET (speed.cudnn_attention_bucket) a sample's own call runs cuDNN's kernel on the sample padded to
a bucket length (causal_sdpa), ~1.7x flash's speed on an H100.
Under autograd the calls of one forward are one node whose backward writes each call's gradients into its slice
(_piecewise), not q/k/v slices each with their own full-size gradient.
The collator is told to take its flash-attn path (no 4D mask; position ids restart per sample). A row that
starts with half of a sample split over a GPU pair (speed.split_long_samples) hands that part to
split_attention.py.
"""

from __future__ import annotations

import functools
import inspect
import time
import weakref
from typing import Any

from sftjobs.trainer.attention import split as split_attention

NAME = "sftjobs_per_sample_sdpa"
SHORT_SAMPLE = 2048  # runs of consecutive samples shorter than this go through one varlen call (row_pieces)
CUDNN_BUCKET = 0  # > 0: single samples through cuDNN's attention, padded to a multiple of this (causal_sdpa)
CUDNN_MAX_LEN = 16384  # the longest sample warm_cudnn builds cuDNN graphs for (cutoff_len)
LOG = None  # where warm_cudnn reports how long the graphs took (lf_train's log)
SPLIT = "split"  # row_pieces' mark for the half of a sample split over a GPU pair (split_attention)


@functools.lru_cache(maxsize=1)
def varlen_causal():
    """torch's flash varlen attention bound to causal masking, or None where torch has none.

    Its signature has changed between torch releases: causal is ``window_size=(-1, 0)`` in some and
    ``is_causal=True`` in others (bind_causal takes either)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return bind_causal(varlen_attn)


def bind_causal(varlen_attn):
    """``varlen_attn`` called causally, with a ``scale`` keyword whether or not this torch's signature has one."""
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:
        bound = functools.partial(varlen_attn, is_causal=True)
    elif "window_size" in params:
        bound = functools.partial(varlen_attn, window_size=(-1, 0))
    else:
        return None
    if "scale" in params:
        return bound

    def scaled(query, *args, scale=None):  # the kernel's scale is 1/sqrt(D): fold any other into the queries
        default = query.shape[-1] ** -0.5
        return bound(query if scale is None or scale == default else query * (scale / default), *args)

    return scaled


def per_sample_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs) -> tuple[Any, None]:
    """transformers attention interface: q [B, H, L, D], k/v [B, Hkv, L, D] -> (out [B, L, H, D], None)."""
    import torch
    import torch.nn.functional as F

    if attention_mask is not None and not (attention_mask.dim() == 2 and bool(attention_mask.all())):
        # a padded batch (not packed): the masked kernel, as transformers' sdpa would run it
        n_rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
        mask = attention_mask
        if mask.dim() == 2:
            length = query.shape[2]
            causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
            mask = causal[None, None] & mask[:, None, None, :].bool()
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    bounds = sample_bounds(kwargs.get("position_ids"), query.shape[0], query.shape[2])
    flash_ok = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
    varlen = varlen_causal() if flash_ok else None
    split = split_attention.CURRENT  # this rank's half of a sample split over a GPU pair: row 0 starts with it
    split_end = split_attention.half_length(split.length, split.half) if split is not None else 0
    plan = row_pieces(bounds, query.device, varlen is not None, split_end)
    call = functools.partial(attend_piece, scaling=scaling, split=split, varlen=varlen)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return _piecewise().apply(query, key, value, plan, call), None
    rows = []
    for b, pieces in enumerate(plan):
        outs = [call(*(t[b:b + 1, :, piece[0]:piece[1]] for t in (query, key, value)), piece) for piece in pieces]
        rows.append(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.contiguous(), None


def attend_piece(q, k, v, piece, scaling, split, varlen):
    """One attention call of row_pieces' plan: q [1, H, n, D], k/v [1, Hkv, n, D] -> [1, n, H, D]."""
    _, _, cu_seq, longest = piece
    if cu_seq is SPLIT:
        return split_attention.split_attention(q, k, v, split, scaling)
    if cu_seq is None:
        return causal_sdpa(q, k, v, scaling).transpose(1, 2)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # [n, h, D]
    return varlen(q, k, v, cu_seq, cu_seq, longest, longest, scale=scaling)[None]


@functools.lru_cache(maxsize=1)
def _piecewise():
    """per_sample_sdpa under autograd as one node: each attention call of the plan runs on its sample's slice of
    q/k/v (its own small graph), and the backward writes each call's q/k/v gradients into its slice of one
    gradient tensor.

    Slicing q/k/v under autograd instead costs, in the backward, a zero-filled full-size gradient per slice and a
    sum of them: on 4x H100, ~16 SliceBackward nodes per layer and their kernels were a large part of prod's
    backward CPU time (bench/results). The kernels that attend are the same, so are the results."""
    import torch

    class PiecewiseAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, key, value, plan, call):
            batch, _, length, _ = query.shape
            out = query.new_empty(batch, length, query.shape[1], query.shape[3])
            graphs = []
            with torch.enable_grad():
                for b, pieces in enumerate(plan):
                    for piece in pieces:
                        start, end = piece[0], piece[1]
                        leaves = [t.detach()[b:b + 1, :, start:end].requires_grad_() for t in (query, key, value)]
                        piece_out = call(*leaves, piece)
                        out[b:b + 1, start:end].copy_(piece_out.detach())
                        graphs.append((b, start, end, leaves, piece_out))
            covered = sum(end - start for _, start, end, _, _ in graphs)
            ctx.graphs, ctx.whole = graphs, covered == batch * length
            return out

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            graphs, ctx.graphs = ctx.graphs, None
            _, _, _, (q0, k0, v0), _ = graphs[0]
            batch, length = grad.shape[0], grad.shape[1]
            shapes = [(batch, t.shape[1], length, t.shape[3]) for t in (q0, k0, v0)]
            make = torch.empty if ctx.whole else torch.zeros
            # the gradients in the layout q/k/v have (views of [B, L, H, D] memory), so each slice takes a copy
            grads = [make(s[0], s[2], s[1], s[3], dtype=grad.dtype, device=grad.device).transpose(1, 2)
                     for s in shapes]
            for b, start, end, leaves, piece_out in graphs:
                parts = torch.autograd.grad(piece_out, leaves, grad[b:b + 1, start:end])
                for full, part in zip(grads, parts, strict=True):
                    full[b:b + 1, :, start:end].copy_(part)
            return grads[0], grads[1], grads[2], None, None

    return PiecewiseAttention


def causal_sdpa(q, k, v, scale):
    """One sample's causal attention, [1, H, L, D] -> [1, H, L, D]: SDPA's kernel as torch picks it or, with
    CUDNN_BUCKET on CUDA, cuDNN's attention on the sample padded at its end to a multiple of CUDNN_BUCKET.

    cuDNN builds an execution graph per shape (bench/results: per new length, ~100 ms of CPU); padding bounds
    the shapes to cutoff_len / CUDNN_BUCKET. The padding is exact: under the causal mask a real query sees only
    keys at or before it, and the padded queries' outputs are cut off, so no gradient comes back through them."""
    import torch.nn.functional as F

    if not (CUDNN_BUCKET and on_gpu(q)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    warm_cudnn(q, k, scale)
    length = q.shape[2]
    padded = length + (-length % CUDNN_BUCKET)
    # fresh tensors of the padded length in the layout the model's q/k/v views have ([1, L, H, D] in memory), so
    # every call of a padded length presents the layouts warm_cudnn's call did
    q, k, v = (F.pad(t.transpose(1, 2), (0, 0, 0, 0, 0, padded - length)).contiguous().transpose(1, 2)
               for t in (q, k, v))
    with cudnn_first():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return grad_like_output()(out)[:, :, :length]


def on_gpu(tensor) -> bool:
    return tensor.is_cuda


def cudnn_first():
    """SDPA's kernel choice for causal_sdpa's padded calls: cuDNN, else flash (whatever the process's priority)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True)


@functools.lru_cache(maxsize=1)
def grad_like_output():
    """An identity whose backward hands on the gradient in its forward output's memory layout.

    torch keys its cached cuDNN attention graphs by q/k/v shapes and strides, not by the output gradient's
    layout, and that layout depends on what comes after the output (a slice that cuts padding or one that does
    not). A graph built for one layout and reused with another gave wrong gradients on an H100 (torch 2.11):
    one layout for every call keeps the graph and the data in agreement."""
    import torch

    class GradLikeOutput(torch.autograd.Function):
        @staticmethod
        def forward(ctx, out):
            ctx.layout = (out.shape, out.stride())
            return out.view_as(out)

        @staticmethod
        def backward(ctx, grad):
            shape, stride = ctx.layout
            if grad.stride() == stride:
                return grad
            return torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device).copy_(grad)

    return GradLikeOutput.apply


def warm_cudnn(q, k, scale) -> None:
    """Once per head shape: a forward and backward at every padded length up to CUDNN_MAX_LEN, so cuDNN builds its
    graphs at the start of the run and not one per new length during training."""
    import torch

    key = (q.shape[1], k.shape[1], q.shape[3], q.dtype, str(q.device), scale, CUDNN_BUCKET, CUDNN_MAX_LEN)
    if key in _WARMED:
        return
    _WARMED.add(key)
    started = time.perf_counter()
    padded_lengths = range(CUDNN_BUCKET, CUDNN_MAX_LEN + CUDNN_BUCKET, CUDNN_BUCKET)
    # the first forward may run without autograd (an evaluation, a recompute's first pass): the backward's graphs
    # are built all the same
    with torch.inference_mode(False), torch.enable_grad():
        for padded in padded_lengths:
            shape = (1, q.shape[1], padded - 1, q.shape[3])
            q1 = torch.randn(shape, device=q.device, dtype=q.dtype, requires_grad=True)
            k1 = torch.randn((1, k.shape[1], *shape[2:]), device=q.device, dtype=q.dtype, requires_grad=True)
            v1 = torch.randn_like(k1, requires_grad=True)
            out = causal_sdpa(q1, k1, v1, scale).transpose(1, 2)
            out.backward(torch.randn_like(out))
    if LOG is not None:
        LOG(f"per-sample attention: cuDNN graphs for {len(padded_lengths)} padded lengths up to "
            f"{padded_lengths[-1]} built in {time.perf_counter() - started:.1f} s")


_WARMED: set = set()


def row_pieces(bounds: list[list[int]], device, varlen: bool, split_end: int = 0
               ) -> list[list[tuple[int, int, Any, int]]]:
    """Per row, its attention calls as (start, end, cu_seq, longest): cu_seq None is one causal SDPA call for
    one sample; SPLIT is the half of a sample split over a GPU pair, [0, split_end) of the first row
    (split_attention); otherwise one varlen call over a run of consecutive short samples (cu_seq their int32
    offsets from start). Built once per forward (every layer asks for the same) and cached with the boundaries.

    Short means under SHORT_SAMPLE tokens, in runs of two or more: torch's varlen kernel (flash) saves the
    per-call cost of many short samples. A long sample gets its own call, which can run cuDNN's kernel
    (CUDNN_BUCKET): on an H100 that took 6.1 ms per layer for a 14980-token sample, against 10.8 on flash
    (bench/results). One call has no per-call cost to save.
    """
    import torch

    key = (bounds, str(device), varlen, SHORT_SAMPLE, split_end)
    if _CACHE[2] is not None and _CACHE[2][0] == key:
        return _CACHE[2][1]
    rows = []
    for number, row in enumerate(bounds):
        pieces: list[tuple[int, int, Any, int]] = []
        run: list[tuple[int, int]] = []
        if number == 0 and split_end:  # the split half's chunks run on without a position restart
            if split_end not in row:
                raise RuntimeError(f"a split sample's half of {split_end} tokens does not end at a sample boundary "
                                   f"of its row ({row[:8]}...)")
            pieces.append((0, split_end, SPLIT, 0))
            row = row[row.index(split_end):]
        for s, e in [*zip(row[:-1], row[1:], strict=True), (row[-1], None)]:  # (end, None) closes the last run
            if e is not None and varlen and e - s < SHORT_SAMPLE:
                run.append((s, e))
                continue
            if len(run) >= 2:
                offsets = torch.tensor([0] + [r_end - run[0][0] for _, r_end in run], dtype=torch.int32)
                pieces.append((run[0][0], run[-1][1], offsets.to(device, non_blocking=True),
                               max(r_end - r_start for r_start, r_end in run)))
            else:
                pieces.extend((r_start, r_end, None, 0) for r_start, r_end in run)
            run = []
            if e is not None:
                pieces.append((s, e, None, 0))
        rows.append(pieces)
    _CACHE[2] = (key, rows)
    return rows


# [weakref to the position_ids tensor, its boundaries, (key, the rows' attention calls)]
_CACHE: list[Any] = [None, None, None]


def sample_bounds(position_ids, batch: int, length: int) -> list[list[int]]:
    """Per row, the sample boundaries [0, s1, ..., length]: where position_ids stop increasing.

    Every layer of one forward gets the same position_ids tensor, so the one GPU->CPU copy is cached on it.
    """
    import torch

    if position_ids is None:
        return [[0, length]] * batch
    ref = _CACHE[0]
    if ref is None or ref() is not position_ids:
        pos = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
        restart = (pos[:, 1:] <= pos[:, :-1]).cpu()
        bounds = [[0] + (torch.nonzero(restart[b]).flatten() + 1).tolist() + [length] for b in range(batch)]
        _CACHE[:] = [weakref.ref(position_ids), bounds, None]
    return _CACHE[1]


def install(log=print, always: bool = False) -> bool:
    """Register the attention and route LLaMA-Factory's model and collator to it. False (and nothing changed)
    where flash-attn is installed, unless ``always``: its varlen kernel already does this for neat_packing."""
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None and not always:
        log("per-sample attention: flash-attn is installed; LLaMA-Factory uses its varlen kernel")
        return False
    import llamafactory.train.sft.workflow as workflow
    from llamafactory.data import collator
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, per_sample_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, lambda *a, **k: None)  # no mask: boundaries come from positions
    load_model = workflow.load_model

    def _load_model(*args, **kwargs):
        model = load_model(*args, **kwargs)
        for sub in model.modules():
            config = getattr(sub, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                config._attn_implementation = NAME
        return model

    workflow.load_model = _load_model
    cls = collator.SFTDataCollatorWith4DAttentionMask
    post_init, call = cls.__post_init__, cls.__call__

    def _post_init(self):
        if self.attn_implementation == NAME:
            # LLaMA-Factory's flash-attn path: no 4D mask, position ids restart per sample
            self.attn_implementation = "flash_attention_2"
            self.sftjobs_per_sample = True
        post_init(self)

    def _call(self, features):
        batch = call(self, features)
        if getattr(self, "sftjobs_per_sample", False) and self.neat_packing and "position_ids" not in batch:
            raise RuntimeError("per-sample attention needs position_ids that restart per packed sample; this "
                               "LLaMA-Factory collator gave none. Set speed.per_sample_attention: false.")
        return batch

    cls.__post_init__, cls.__call__ = _post_init, _call
    kernel = (f"causal SDPA per packed sample; runs of samples under {SHORT_SAMPLE} tokens in one flash varlen call "
              "on CUDA" if varlen_causal() is not None else "causal SDPA per packed sample")
    log(f"per-sample attention: registered {NAME} ({kernel}; no 4D mask)")
    return True

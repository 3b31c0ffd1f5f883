"""Sample-isolated attention for packed rows without flash-attn: causal SDPA once per sample.

LLaMA-Factory's neat_packing keeps samples apart either with flash-attn's varlen kernel (position ids restart
per sample, no mask) or, where flash-attn is missing, with a 4D block-diagonal mask that makes SDPA compute the
whole cutoff_len^2 score matrix per layer (26 ms vs 3 ms per layer for a 15000-token pack of 4 samples on an
H100, bench/README.md). This registers an attention function that does what the varlen kernel does: it finds
the sample boundaries where position_ids restart and runs SDPA's causal (flash) kernel on each sample alone.
The collator is told to take its flash-attn path (no 4D mask; position ids restart per sample).
"""

from __future__ import annotations

import weakref
from typing import Any

NAME = "sftjobs_per_sample_sdpa"


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
    rows = []
    for b in range(query.shape[0]):
        pieces = [F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                                 is_causal=True, scale=scaling, enable_gqa=True)
                  for s, e in zip(bounds[b][:-1], bounds[b][1:], strict=True)]
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


_CACHE: list[Any] = [None, None]  # [weakref to the position_ids tensor, its boundaries]


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
        _CACHE[:] = [weakref.ref(position_ids), bounds]
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
    log(f"per-sample attention: registered {NAME} (causal SDPA per packed sample; no 4D mask)")
    return True

"""speed.liger_chunk_mem_const: Liger's fused linear cross-entropy in fewer, larger chunks of tokens.

Liger (train.enable_liger_kernel) never holds a sample's whole logits: it walks the tokens in chunks, and for each
chunk computes the chunk's logits (tokens x vocabulary), the loss and its gradient, the hidden states' gradient, and
adds the chunk's share of the lm_head weight's gradient into one vocabulary x hidden buffer. Its chunk is sized so
that the transient logits stay within ``chunk_mem_const`` x tokens x hidden elements, and ``chunk_mem_const`` is 1
unless a caller passes another (liger_kernel 0.8.5; its GPT-OSS forward passes 8). With Qwen2.5's vocabulary of
151,936 and hidden size of 2,048 that is 128 tokens a chunk for a 7,500-token row and 256 for a 15,000-token pack:
~59 chunks, each reading and writing the whole 0.6 GB bf16 weight gradient (~70 GB of memory traffic a micro-step)
in a matmul only 128-256 deep, plus ~10 kernel launches a chunk on a CPU-bound step.

With ``chunk_mem_const`` 8 the same rows take 1,024 and 2,048 tokens a chunk (8 chunks), for ~1-2 GB more transient
memory (sftjobs/planning/memory.py counts it). The loss and gradients are the same sums, taken over fewer chunks:
they differ by floating-point order only, and the weight gradient, accumulated in bf16 chunk by chunk, is rounded
fewer times (tests/test_liger_loss_chunks_gpu.py compares them on a GPU).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


def install(chunk_mem_const: int, log: Callable[[str], None] | None = None) -> None:
    """Make ``chunk_mem_const`` the default of Liger's functional fused linear cross-entropy, which its causal-LM
    loss (liger_kernel.transformers.model.loss_utils) calls through the module at each step; an explicit
    ``chunk_mem_const`` of a caller still wins."""
    if chunk_mem_const < 1:
        raise ValueError(f"speed.liger_chunk_mem_const must be >= 1, not {chunk_mem_const}")
    from liger_kernel.transformers import functional

    original = functional.liger_fused_linear_cross_entropy
    stock = getattr(original, "__wrapped__", original)  # installed twice: wrap Liger's own function once

    @functools.wraps(stock)
    def wider_chunks(*args: Any, chunk_mem_const: int = chunk_mem_const, **kwargs: Any) -> Any:
        return stock(*args, chunk_mem_const=chunk_mem_const, **kwargs)

    functional.liger_fused_linear_cross_entropy = wider_chunks
    if log:
        log(f"speed.liger_chunk_mem_const on: Liger's fused linear cross-entropy with chunk_mem_const "
            f"{chunk_mem_const} (Liger's default 1)")

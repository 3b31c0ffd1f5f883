"""speed.recompute_by_length: each micro-batch recomputes only as many decoder layers as its length needs.

LLaMA-Factory turns gradient checkpointing on for every decoder layer (transformers' GradientCheckpointingLayer:
each layer checks its own ``gradient_checkpointing`` flag when it runs). The memory plan sizes recompute for the
longest micro-batch (cutoff_len tokens), but most micro-batches are shorter. With the plan's schedule
(sftjobs.planning.memory.recompute_schedule: entry k = the most tokens that fit with the first k layers recomputed),
a forward pre-hook on the model sets, before each forward, the first k layers to recompute and the others to keep
their activations, k being the fewest layers whose entry holds the micro-batch's tokens (all where none does).

The loss and gradients are those of full recompute: a recomputed layer runs the same forward again in the backward
pass (tests/test_lf_train.py compares them through LLaMA-Factory on two CPU ranks, tests/test_recompute_by_length_gpu.py
in bf16 on a GPU). When training ends the hook is removed and every layer recomputes again, as LLaMA-Factory set it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def layers_to_recompute(schedule: Sequence[int], tokens: int) -> int:
    """The fewest leading layers to recompute for a micro-batch of ``tokens``: the first k whose entry holds it;
    every layer (len(schedule) - 1) where none does."""
    return next((k for k, most in enumerate(schedule) if tokens <= most), len(schedule) - 1)


def parse_schedule(text: str) -> list[int]:
    """The entry's --recompute-by-length value: the schedule's token counts, comma-separated."""
    try:
        schedule = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--recompute-by-length {text!r}: expected comma-separated token counts "
                         "(the memory plan's recompute_by_tokens)") from None
    if len(schedule) < 2 or any(n < 0 for n in schedule):
        raise ValueError(f"--recompute-by-length {text!r}: expected one count >= 0 per layer and one for none")
    return schedule


def checkpointed_layers(model: Any) -> list[Any]:
    """The model's decoder layers that check a gradient_checkpointing flag (transformers' GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def micro_batch_tokens(args: tuple, kwargs: dict[str, Any]) -> int | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
        return None if ids is None else int(ids.shape[0] * ids.shape[1])
    return int(ids.numel())


def attach(model: Any, schedule: Sequence[int], log: Callable[[str], None] = print) -> Any | None:
    """Set each decoder layer's recompute per forward from the micro-batch's tokens; the hook's handle, or None
    (one logged line says why) where the model's layers do not match the schedule or recompute is off."""
    layers = checkpointed_layers(model)
    if len(layers) != len(schedule) - 1:
        log(f"speed.recompute_by_length off: the model has {len(layers)} checkpointable layers, the memory plan's "
            f"schedule {len(schedule) - 1}; every layer recomputes as LLaMA-Factory set it")
        return None
    if not all(layer.gradient_checkpointing for layer in layers):
        log("speed.recompute_by_length off: gradient checkpointing is not on for every layer; nothing to do")
        return None
    seen: dict[int, int] = {}

    def choose(module, args, kwargs):
        if not module.training:
            return None
        tokens = micro_batch_tokens(args, kwargs)
        if tokens is None:
            return None
        k = layers_to_recompute(schedule, tokens)
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = index < k
        if k not in seen and len(seen) < 8:  # a few lines, not one per step
            seen[k] = tokens
            log(f"speed.recompute_by_length: {k} of {len(layers)} layers recomputed for a micro-batch of {tokens} tokens")
        return None

    log(f"speed.recompute_by_length on: no layer recomputed up to {schedule[0]} tokens a micro-batch, "
        f"all {len(layers)} beyond {max(schedule)}")
    return model.register_forward_pre_hook(choose, with_kwargs=True)


def callback(schedule: Sequence[int], log: Callable[[str], None] = print):
    """A TrainerCallback that attaches the hook to the trainer's model when training begins (after LLaMA-Factory
    has turned gradient checkpointing on)."""
    from transformers import TrainerCallback

    class RecomputeByLength(TrainerCallback):
        handle = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None and self.handle is None:
                self.handle = attach(model, schedule, log) or False

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if self.handle:
                self.handle.remove()
                for layer in checkpointed_layers(model):
                    layer.gradient_checkpointing = True
                self.handle = None

    return RecomputeByLength()

"""What every training process runs: LLaMA-Factory's own ``run_exp()`` (what ``llamafactory-cli train CFG.yaml``
runs) with sftjobs' in-process additions.

    python -m sftjobs.trainer.entry [--balance-ranks | --pack-rank-samples [--skip-idle-micro-steps]
                                     [--split-long-samples]] [--per-sample-attention]
                                     [--cudnn-attention-bucket N] [--recompute-by-length T0,T1,...]
                                     [--memory-log PREFIX]
                                     [--callback MODULE:FUNCTION ...] CFG.yaml [key=value ...]

The train step starts it under torchrun on each node (as ``FORCE_TORCHRUN=1 llamafactory-cli train`` would);
the YAML and key=value overrides are read by LLaMA-Factory's own parser, unchanged.

  --balance-ranks         each optimizer step's samples are spread over the GPUs by length (rank_balance.py);
                          the samples of every step stay the ones the trainer's random order gives
  --per-sample-attention  causal SDPA per packed sample where flash-attn is missing (per_sample_attention.py)
  --cudnn-attention-bucket N  per-sample attention's single samples through cuDNN's kernel, padded to a multiple
                          of N (per_sample_attention.CUDNN_BUCKET; GPU only)
  --pack-rank-samples     --balance-ranks with each GPU's samples of a step packed into its micro-batches
                          (rank_balance.pack_chunk; PackedRows), attention kept inside each sample
  --skip-idle-micro-steps with --pack-rank-samples: a micro-step with nothing to compute on any GPU (IDLE_PACK)
                          runs no forward or backward, instead of a one-token row (install_idle_skip)
  --split-long-samples    with --pack-rank-samples: a step's longest sample, where it costs more than a GPU's
                          share, is split over a pair of GPUs (rank_balance, split_attention; install_split_halves)
  --recompute-by-length T0,T1,...  each micro-batch recomputes only its first k decoder layers, k the first entry
                          that holds its tokens (the memory plan's recompute_by_tokens; recompute_by_length.py)
  always                  a batch of one unpacked row is not padded to a multiple of 8, so SDPA keeps its causal
                          flash kernel (install_unpadded_single_rows)
  TENSORBOARD_LOGGING_DIR on transformers 4: passed on as the logging_dir=... override, which is what that version's
                          TensorBoard callback reads (tensorboard_logging_dir; transformers 5 reads the variable)
  --memory-log PREFIX     every logging step, each rank appends its CUDA allocator numbers to PREFIX-rank<R>.jsonl:
                          memory allocated between steps (model states + anything that leaks), the peak allocated
                          since the last line, and what the caching allocator holds (what nvidia-smi shows)
  --callback MODULE:FUNCTION  a hook for measuring the run as it is: FUNCTION of MODULE (imported from sys.path) is
                          called with no arguments after sftjobs' patches, just before run_exp (sys.argv then holds
                          the YAML and the overrides), and returns a transformers TrainerCallback or a list of them,
                          passed to the trainer with sftjobs' own; repeatable. The benchmark's step timer comes in
                          this way (bench/step_timer.py:callbacks); the train step passes none
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from sftjobs.trainer import patches
from sftjobs.trainer import sampler as rank_balance
from sftjobs.trainer.attention import split as split_attention

LENGTH_SLICE = 4096  # rows per Arrow slice when reading token counts
IGNORE_INDEX = split_attention.IGNORE_INDEX  # LLaMA-Factory's and transformers' label for "no loss here"
IDLE_KEY = "sftjobs_idle"  # a PackedRows row standing for an idle micro-step (install_idle_skip)
SPLIT_KEY = "sftjobs_split"  # a PackedRows row that starts with half of a split sample (install_split_halves)


def log(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[sftjobs train] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- length-balanced sampler


def token_lengths(dataset) -> list[int] | None:
    """Tokens per row of a tokenized datasets.Dataset, read column-wise in Arrow slices (no Python lists of
    token ids); None for datasets without input_ids or without a length (streaming)."""
    try:
        n = len(dataset)
    except TypeError:
        return None
    if "input_ids" not in getattr(dataset, "column_names", []):
        return None
    import pyarrow.compute as pc

    ids = dataset.select_columns(["input_ids"]).with_format("arrow")
    lengths: list[int] = []
    for start in range(0, n, LENGTH_SLICE):
        table = ids[start:start + LENGTH_SLICE]
        lengths.extend(pc.list_value_length(table.column("input_ids")).to_pylist())
    return lengths


def make_balanced_sampler_class():
    import torch

    class BalancedSampler(torch.utils.data.Sampler):
        """The base sampler's order, reordered inside each optimizer step (rank_balance.balanced_order)."""

        def __init__(self, base, lengths, world: int, per_device: int, accum: int, layout: str,
                     pack_capacity: int | None = None, attention_span: float | None = None, split: bool = False):
            self.base, self.lengths = base, lengths
            self.world, self.per_device, self.accum, self.layout = world, per_device, accum, layout
            self.pack_capacity, self.attention_span, self.split = pack_capacity, attention_span, split

        def __len__(self) -> int:
            return len(self.base)

        def __iter__(self):
            base = list(iter(self.base))
            args = (self.lengths, self.world, self.per_device, self.accum)
            if self.pack_capacity:  # tuples of indices: PackedRows merges each into one row
                order = list(rank_balance.packed_order(base, self.lengths, self.world, self.accum,
                                                       self.pack_capacity, self.layout, self.attention_span,
                                                       self.split))
                label, stats = "pack rank samples", lambda: rank_balance.pack_summary(
                    base, order, self.lengths, self.world, self.accum, self.attention_span)
            else:
                order = list(rank_balance.balanced_order(base, *args, self.layout))
                label, stats = "balance ranks", lambda: rank_balance.summary(base, order, *args)
            if not getattr(self, "reported", False):  # once per run: the first epoch's order
                self.reported = True
                log(f"{label}: {json.dumps(stats())}")
            yield from order

        def set_epoch(self, epoch: int) -> None:  # accelerate forwards the epoch: the base reshuffles by it
            if hasattr(self.base, "set_epoch"):
                self.base.set_epoch(epoch)

    return BalancedSampler


def seedable_base(trainer, sampler):
    """What accelerate would turn the trainer's RandomSampler into (same seed, same epochs), so the balanced
    order regroups exactly the steps an unbalanced run would train on."""
    from torch.utils.data import RandomSampler

    config = getattr(trainer.accelerator, "dataloader_config", None)
    if type(sampler) is not RandomSampler or not getattr(config, "use_seedable_sampler", False):
        return sampler
    from accelerate.data_loader import SeedableRandomSampler

    return SeedableRandomSampler(data_source=sampler.data_source, replacement=sampler.replacement,
                                 num_samples=sampler._num_samples, generator=sampler.generator,
                                 data_seed=config.data_seed)


def zero_stage(trainer) -> int | None:
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return getattr(plugin, "zero_stage", None) if plugin is not None else None


def attention_span(model) -> float | None:
    """The sample length at which causal attention costs about as much as the rest of the model: parameters over
    (hidden size x layers), halved because attention kernels reach about half the matmul rate."""
    config = getattr(model, "config", None)
    hidden, layers = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
    if not hidden or not layers:
        return None
    params = sum(getattr(p, "ds_numel", 0) or p.numel() for p in model.parameters())
    return params / (hidden * layers) / 2


def split_off_reason(world: int, stage: int | None) -> str | None:
    """Why speed.split_long_samples cannot run here, or None. ZeRO-3 gathers parameters in the forward too;
    the pair's collectives have not been tried between those (DeepSpeed ZeRO-3 does not start on the CPU)."""
    if world % 2:
        return f"{world} ranks do not form pairs"
    if stage is not None and stage >= 3:
        return "not tried under ZeRO stage 3"
    return None


def install_balanced_sampler(pack: bool = False, split: bool = False) -> None:
    """speed.balance_ranks; with ``pack`` (speed.pack_rank_samples) the sampler yields packs of indices, which
    install_packed_rows turns into rows; with ``split`` (speed.split_long_samples) packs may hold halves of a
    sample split over a rank pair, whose process groups are made here (every rank builds its sampler)."""
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

    original = CustomSeq2SeqTrainer._get_train_sampler
    BalancedSampler = make_balanced_sampler_class()

    def _get_train_sampler(self, *args, **kwargs):
        sampler = original(self, *args, **kwargs)
        dataset = (args[0] if args else kwargs.get("train_dataset")) or self.train_dataset
        if sampler is None or dataset is None:
            return sampler
        lengths = token_lengths(getattr(dataset, "rows", dataset))
        if lengths is None:
            log("balance ranks: the training set has no token lengths (streaming?); keeping the trainer's order")
            return sampler
        world = self.accelerator.num_processes
        stage = zero_stage(self)
        layout = rank_balance.layout_for_zero_stage(stage)
        per_device, accum = self.args.per_device_train_batch_size, self.args.gradient_accumulation_steps
        log(f"balance ranks: {len(lengths)} rows, {world} ranks x {per_device} x ga {accum}, "
            f"layout {layout} (ZeRO stage {stage})")
        if not pack:
            return BalancedSampler(seedable_base(self, sampler), lengths, world, per_device, accum, layout)
        if per_device != 1 or not hasattr(dataset, "rows"):
            raise RuntimeError(f"pack rank samples needs per_device_train_batch_size 1 and an unpacked data set "
                               f"(got {per_device}, {type(dataset).__name__})")
        capacity = max(lengths, default=1)  # a pack needs no more memory than the longest sample alone
        span = attention_span(self.model)
        log(f"pack rank samples: packs of <= {capacity} tokens, attention span {span and round(span)}")
        off = split_off_reason(world, stage) if split else None
        pairs = split and off is None
        if off:
            log(f"split long samples: off ({off})")
        if pairs:
            split_attention.make_pair_groups(world)
            log(f"split long samples: {world // 2} rank pair(s)")
        return BalancedSampler(seedable_base(self, sampler), lengths, world, per_device, accum, layout,
                               pack_capacity=capacity, attention_span=span, split=pairs)

    CustomSeq2SeqTrainer._get_train_sampler = _get_train_sampler


# ----------------------------------------------------------------------------- packed rows


def merge_rows(rows: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Samples as one row: input_ids and labels concatenated, position ids restarting per sample (where
    per-sample attention finds the boundaries), no mask. No samples: a one-token row without labels."""
    if not rows:
        return {"input_ids": [pad_id], "attention_mask": [1], "labels": [IGNORE_INDEX], "position_ids": [0]}
    merged: dict[str, Any] = {"input_ids": [], "attention_mask": [], "labels": [], "position_ids": []}
    for row in rows:
        if any(row.get(key) for key in ("images", "videos", "audios")):
            raise RuntimeError("pack rank samples is for text data; this set has images, videos or audios")
        merged["input_ids"] += row["input_ids"]
        merged["labels"] += row["labels"]
        merged["attention_mask"] += [1] * len(row["input_ids"])
        merged["position_ids"] += list(range(len(row["input_ids"])))
    return merged


def merge_split_row(sample: dict[str, Any], half: int, rest: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Half of a split sample, then ``rest`` as merge_rows packs them, as one row. The half's labels are in target
    form (split_attention.half_row); the target of its last position goes into the next slot: the first of
    ``rest`` (a sample's first label is a prompt token, never a target) or, with nothing after it, a pad token
    of its own (its position restarts, so per-sample attention keeps it apart)."""
    piece = split_attention.half_row(sample["input_ids"], sample["labels"], half)
    merged = {"input_ids": piece["input_ids"], "labels": piece["labels"], "position_ids": piece["position_ids"],
              "attention_mask": [1] * len(piece["input_ids"])}
    if rest:
        after = merge_rows(rest, pad_id)
        after["labels"] = [piece["last_target"]] + after["labels"][1:]
    elif piece["last_target"] != IGNORE_INDEX:
        after = {"input_ids": [pad_id], "attention_mask": [1], "labels": [piece["last_target"]], "position_ids": [0]}
    else:
        after = {key: [] for key in merged}
    for key in merged:
        merged[key] = merged[key] + after[key]
    merged[SPLIT_KEY] = {"length": len(sample["input_ids"]), "half": half}
    return merged


def make_packed_rows_class():
    import torch

    class PackedRows(torch.utils.data.Dataset):
        """The tokenized set, read by the packed sampler's tuples of indices (one merged row each)."""

        def __init__(self, rows, pad_id: int, skip_idle: bool = False):
            self.rows, self.pad_id, self.skip_idle = rows, pad_id, skip_idle

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, key):
            if key == rank_balance.IDLE_PACK:  # nothing to compute on any rank in this micro-step
                return {IDLE_KEY: True} if self.skip_idle else merge_rows([], self.pad_id)
            if key and isinstance(key[0], rank_balance.Half):  # pack_chunk puts a split half first
                return merge_split_row(self.rows[key[0].index], key[0].half, [self.rows[i] for i in key[1:]],
                                       self.pad_id)
            if isinstance(key, tuple):
                return merge_rows([self.rows[i] for i in key], self.pad_id)
            return self.rows[key]

        def __getitems__(self, keys):
            return [self[key] for key in keys]

    return PackedRows


def install_pack_rank_samples(skip_idle: bool = False, split: bool = False) -> None:
    """speed.pack_rank_samples: the packed sampler, PackedRows behind it, and per-sample attention (needed even
    where flash-attn is installed: a packed row's mask is all ones); with ``skip_idle``
    (speed.skip_idle_micro_steps) idle micro-steps are skipped; with ``split`` (speed.split_long_samples) long
    samples may be split over a rank pair."""
    from sftjobs.trainer.attention import per_sample as per_sample_attention

    install_balanced_sampler(pack=True, split=split)
    install_packed_rows(skip_idle)
    if skip_idle:
        install_idle_skip()
    if split:
        install_split_halves()
    per_sample_attention.install(log=log, always=True)


def install_split_halves() -> None:
    """A row starting with half of a split sample: the collator carries its SPLIT_KEY (length, half) past
    LLaMA-Factory's collator, and the training step hands it, with the pair's process group, to the attention
    (split_attention.CURRENT) for that micro-step's forward and backward."""
    from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask as Collator
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

    call = Collator.__call__

    def _call(self, features):
        splits = [feature.pop(SPLIT_KEY, None) for feature in features]
        batch = call(self, features)
        if any(splits):
            if len(features) != 1:
                raise RuntimeError("split long samples needs per_device_train_batch_size 1")
            batch[SPLIT_KEY] = splits[0]
        return batch

    Collator.__call__ = _call
    training_step = CustomSeq2SeqTrainer.training_step

    def _training_step(self, model, inputs, *args, **kwargs):
        split = inputs.pop(SPLIT_KEY, None)
        if split is None:
            return training_step(self, model, inputs, *args, **kwargs)
        import torch.distributed as dist

        rank = dist.get_rank()
        if split["half"] != rank % 2:
            raise RuntimeError(f"rank {rank} got half {split['half']} of a split sample; pairs are (2p, 2p+1)")
        if not getattr(self, "sftjobs_split_reported", False):
            self.sftjobs_split_reported = True
            log(f"split long samples: a {split['length']}-token sample ran split over ranks {rank - rank % 2} "
                f"and {rank - rank % 2 + 1}")
        split_attention.CURRENT = split_attention.SplitHalf(split["length"], split["half"],
                                                            split_attention.GROUPS[rank // 2])
        try:
            return training_step(self, model, inputs, *args, **kwargs)
        finally:
            split_attention.CURRENT = None

    CustomSeq2SeqTrainer.training_step = _training_step


def install_idle_skip() -> None:
    """An IDLE_PACK micro-step (empty on every rank: rank_balance.pack_chunk) runs no forward and no backward.

    Every rank skips the same micro-step, so no collective is left waiting (ZeRO-2/3 communicate in every
    micro-step's backward, ZeRO-3 in the forward too). It is never the step's last micro-step, where the
    gradients are synchronised and the optimizer steps: DeepSpeed takes the boundary from accelerate and counts
    the backward passes it saw (its "unmanaged" mode), DDP syncs in the last backward only. Its loss and gradient
    would have been zero (no labels), so the update and the logged loss are unchanged. The collator turns the
    idle rows into a zero-length batch, which training_step recognises by its shape (no GPU sync).
    """
    import torch
    from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask as Collator
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

    call = Collator.__call__

    def _call(self, features):
        if features and all(feature.get(IDLE_KEY) for feature in features):
            empty = torch.zeros((len(features), 0), dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone(), "labels": empty.clone()}
        return call(self, features)

    Collator.__call__ = _call
    training_step = CustomSeq2SeqTrainer.training_step

    def _training_step(self, model, inputs, *args, **kwargs):
        if inputs["input_ids"].shape[-1] == 0:
            if not getattr(self, "sftjobs_idle_reported", False):
                self.sftjobs_idle_reported = True
                log("skip idle micro-steps: a micro-step with nothing to compute on any GPU was skipped")
            return torch.zeros((), device=self.args.device)
        return training_step(self, model, inputs, *args, **kwargs)

    CustomSeq2SeqTrainer.training_step = _training_step


def install_packed_rows(skip_idle: bool = False) -> None:
    """The training dataloader reads PackedRows (part of install_pack_rank_samples)."""
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

    packed_rows = make_packed_rows_class()
    original = CustomSeq2SeqTrainer.get_train_dataloader

    def get_train_dataloader(self):
        rows = self.train_dataset
        pad_id = getattr(self.processing_class, "pad_token_id", None)
        self.train_dataset = packed_rows(rows, 0 if pad_id is None else pad_id, skip_idle)
        try:
            return original(self)
        finally:
            self.train_dataset = rows

    CustomSeq2SeqTrainer.get_train_dataloader = get_train_dataloader


# ----------------------------------------------------------------------------- single rows unpadded


def install_unpadded_single_rows() -> None:
    """A batch of one unpacked row is not padded to a multiple of 8.

    LLaMA-Factory's collator pads every batch to a multiple of 8 (for shift-short attention, which sftjobs does
    not use). With bs 1 that adds up to 7 pad tokens to the row, so transformers can no longer drop the mask:
    it builds an L x L boolean mask, and SDPA then runs its memory-efficient kernel over the whole square
    instead of the causal flash kernel (bench/results: attention was ~24% of a prod step on H200). The pad
    tokens carry no labels and no real token attends to them (causal, right padding), so the loss and the
    gradients are those of the padded row.
    """
    from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask as Collator

    call = Collator.__call__

    def _call(self, features):
        if len(features) != 1 or self.neat_packing or self.block_diag_attn or self.pad_to_multiple_of is None:
            return call(self, features)
        multiple, self.pad_to_multiple_of = self.pad_to_multiple_of, None
        try:
            return call(self, features)
        finally:
            self.pad_to_multiple_of = multiple

    Collator.__call__ = _call


# ----------------------------------------------------------------------------- allocator memory log


def make_memory_callback(prefix: str):
    import torch
    from transformers import TrainerCallback

    class MemoryLog(TrainerCallback):
        """Per logging step: allocated between steps, peak allocated since the last line, reserved."""

        def __init__(self):
            rank = int(os.environ.get("RANK", "0"))
            self.path = Path(f"{prefix}-rank{rank}.jsonl")

        def _write(self, state) -> None:
            if not torch.cuda.is_available():
                return
            device = torch.cuda.current_device()
            mib = 2 ** 20
            gpu = {"index": int(os.environ.get("LOCAL_RANK", device)),
                   "mem_used_mib": round(torch.cuda.memory_allocated(device) / mib, 1),
                   "peak_alloc_mib": round(torch.cuda.max_memory_allocated(device) / mib, 1),
                   "reserved_mib": round(torch.cuda.memory_reserved(device) / mib, 1)}
            torch.cuda.reset_peak_memory_stats(device)
            line = {"time": time.time(), "step": state.global_step, "host": socket.gethostname(),
                    "source": "torch.cuda allocator", "gpus": [gpu]}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as handle:
                handle.write(json.dumps(line) + "\n")

        def on_step_end(self, args, state, control, **kwargs):
            every = max(1, int(args.logging_steps or 1))
            if state.global_step % every == 0 or state.global_step >= state.max_steps:
                self._write(state)

    return MemoryLog()


def install_cudnn_attention(bucket: int, config: str, overrides: list[str]) -> None:
    """speed.cudnn_attention_bucket: per-sample attention's single samples through cuDNN, padded to a multiple of
    ``bucket``, with graphs built for every padded length up to the run's cutoff_len."""
    import yaml

    from sftjobs.trainer.attention import per_sample as per_sample_attention

    cutoff = (yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}).get("cutoff_len")
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "cutoff_len":
            cutoff = value
    per_sample_attention.CUDNN_BUCKET = bucket
    per_sample_attention.LOG = log
    if cutoff:
        per_sample_attention.CUDNN_MAX_LEN = int(cutoff)
    log(f"per-sample attention: cuDNN for single samples, lengths padded to a multiple of {bucket} "
        f"(graphs for every padded length up to {per_sample_attention.CUDNN_MAX_LEN} built at the first forward)")


# ----------------------------------------------------------------------------- TensorBoard's folder


def tensorboard_logging_dir(config: str, overrides: list[str]) -> list[str]:
    """tracking: tensorboard on transformers 4. The step script exports TENSORBOARD_LOGGING_DIR (the run directory's
    tensorboard/<step>: sftjobs.planning.tracking), which transformers 5's TensorBoardCallback reads; transformers 4
    (4.56.2) reads TrainingArguments.logging_dir instead, whose default is under output_dir. There the folder is
    passed as a ``logging_dir=`` override, so the rendered YAML stays without the key (transformers 5 deprecates
    it). Nothing where the variable is unset, on transformers 5, or where the YAML or an override sets logging_dir."""
    logdir = os.environ.get("TENSORBOARD_LOGGING_DIR")
    version = patches.installed_version("transformers")
    if not logdir or version is None or not patches.version_matches(version, ("<5",)):
        return []
    import yaml

    if any(item.partition("=")[0].strip() == "logging_dir" for item in overrides):
        return []
    if "logging_dir" in (yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}):
        return []
    log(f"tensorboard: logging_dir={logdir} (transformers {version} reads TrainingArguments.logging_dir, not "
        "TENSORBOARD_LOGGING_DIR)")
    return [f"logging_dir={logdir}"]  # key=value as LLaMA-Factory reads its command line


# ----------------------------------------------------------------------------- entry


def load_callbacks(specs: list[str]) -> list[Any]:
    """--callback MODULE:FUNCTION: each factory called once, its TrainerCallback (or list of them) returned."""
    import importlib

    found: list[Any] = []
    for spec in specs:
        module, _, function = spec.partition(":")
        if not module or not function:
            raise SystemExit(f"--callback {spec!r}: expected MODULE:FUNCTION (e.g. bench.step_timer:callbacks)")
        made = getattr(importlib.import_module(module), function)()
        made = list(made) if isinstance(made, (list, tuple)) else [made]
        log(f"callback {spec}: {', '.join(type(c).__name__ for c in made)}")
        found += made
    return found


# The profile's speed.* keys that are on/off switches of this entry: speed.KEY true -> --KEY-WITH-DASHES
# (sftjobs.steps.train.training_command writes them from the rendered speed settings).
SPEED_SWITCHES = ("balance_ranks", "per_sample_attention", "pack_rank_samples", "skip_idle_micro_steps",
                  "split_long_samples", "lean_zero_step", "fused_zero_update")
# The profile's integer speed.* keys that are options of this entry: speed.KEY N (N > 0) -> --KEY-WITH-DASHES N
SPEED_VALUES = {"cudnn_attention_bucket": "packed samples' attention on cuDNN, padded to a multiple of N tokens",
                "liger_chunk_mem_const": "Liger's fused linear cross-entropy with this chunk_mem_const"}


def switch_flag(key: str) -> str:
    """The entry's command-line flag of a speed.* switch."""
    return "--" + key.replace("_", "-")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sftjobs.trainer.entry", description=__doc__.splitlines()[0])
    for key in SPEED_SWITCHES:
        parser.add_argument(switch_flag(key), action="store_true")
    for key, what in SPEED_VALUES.items():
        parser.add_argument(switch_flag(key), type=int, default=0, metavar="N", help=f"{what} (0: off)")
    parser.add_argument("--recompute-by-length", default="", metavar="T0,T1,...",
                        help="speed.recompute_by_length: the memory plan's recompute_by_tokens (entry k: the most "
                             "tokens a micro-batch may hold with its first k layers recomputed)")
    parser.add_argument("--memory-log", metavar="PREFIX")
    parser.add_argument("--stop-marker", metavar="PATH",
                        help="save at USR2/SIGTERM, stop, and write this JSON (sftjobs.trainer.signal_save)")
    parser.add_argument("--save-log", metavar="PATH", help="append each checkpoint save's duration (JSON lines)")
    parser.add_argument("--callback", action="append", default=[], metavar="MODULE:FUNCTION",
                        help="a factory of extra TrainerCallbacks (the benchmark's timer); repeatable")
    parser.add_argument("config", help="LLaMA-Factory training YAML")
    parser.add_argument("overrides", nargs="*", help="key=value, as llamafactory-cli takes them")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    callbacks: list[Any] = []
    if opts.stop_marker or opts.save_log:
        from sftjobs.trainer.signal_save import SignalSave

        signal_save = SignalSave(Path(opts.stop_marker) if opts.stop_marker else None,
                                 Path(opts.save_log) if opts.save_log else None, log=log)
        if opts.stop_marker:
            signal_save.install()  # first thing: a signal while the model loads still ends in a save
            if patches.decide(["signal_save.loader_workers"], log=log)["signal_save.loader_workers"].on:
                from sftjobs.trainer.signal_save import keep_loader_workers_on_sigterm

                keep_loader_workers_on_sigterm()
        callbacks.append(signal_save)
    if opts.skip_idle_micro_steps and not opts.pack_rank_samples:
        raise SystemExit("--skip-idle-micro-steps needs --pack-rank-samples (only packed steps have idle micro-steps)")
    if opts.split_long_samples and not opts.pack_rank_samples:
        raise SystemExit("--split-long-samples needs --pack-rank-samples (halves of a sample are packed rows)")
    # each patch only where its versions are verified and its targets exist (sftjobs/trainer/patches.py); a
    # feature that is off says so in one line and the run goes on stock
    decisions = patches.decide(patches.speed_features(vars(opts)), log=log)
    patches.switch_off(opts, decisions)
    if decisions["unpadded_single_rows"].on:
        install_unpadded_single_rows()
    if opts.pack_rank_samples:
        install_pack_rank_samples(skip_idle=opts.skip_idle_micro_steps, split=opts.split_long_samples)
    elif opts.balance_ranks:
        install_balanced_sampler()
    if opts.per_sample_attention and not opts.pack_rank_samples:
        from sftjobs.trainer.attention import per_sample as per_sample_attention

        per_sample_attention.install(log=log)
    if opts.cudnn_attention_bucket:
        install_cudnn_attention(opts.cudnn_attention_bucket, opts.config, opts.overrides)
    if opts.liger_chunk_mem_const:
        from sftjobs.trainer import liger_loss_chunks

        liger_loss_chunks.install(opts.liger_chunk_mem_const, log=log)
    if opts.lean_zero_step:
        from sftjobs.trainer import lean_zero_step

        lean_zero_step.install(log=log)
    if opts.fused_zero_update:
        from sftjobs.trainer import fused_zero_update

        fused_zero_update.install(log=log)
    if opts.recompute_by_length:
        from sftjobs.trainer import recompute_by_length

        try:
            schedule = recompute_by_length.parse_schedule(opts.recompute_by_length)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        callbacks.append(recompute_by_length.callback(schedule, log=log))
    if opts.memory_log:
        callbacks.append(make_memory_callback(opts.memory_log))
    from llamafactory.train.tuner import run_exp

    overrides = [*opts.overrides, *tensorboard_logging_dir(opts.config, opts.overrides)]
    sys.argv = [sys.argv[0], opts.config, *overrides]  # LLaMA-Factory's read_args() parses sys.argv
    callbacks += load_callbacks(opts.callback)
    run_exp(callbacks=callbacks)


if __name__ == "__main__":
    main()

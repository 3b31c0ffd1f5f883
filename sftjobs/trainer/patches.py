"""Every place sftjobs patches or reaches into LLaMA-Factory, transformers, accelerate, DeepSpeed or torch internals,
with the versions each was verified on, and the check that decides which speed features can run here.

PATCHES lists the places: what each serves (a speed option, or a pre-flight check), the targets (``module:attr.path``;
``replaces`` are the ones sftjobs assigns), the versions the test tiers verified it on, where it is installed and how
it is undone. FEATURES says which patches each feature needs and what turning it off costs.

decide() is called where the patches are installed (sftjobs/trainer/entry.py main) and by the pre-flight step
(before GPU time is spent). For each feature asked for:
  - a package outside the verified versions, or a target that does not exist (resolved by import and attribute
    lookup, nothing called), turns the feature OFF with one logged line: which feature, why, what it costs.
    The run then goes on stock (LLaMA-Factory's own sampler, collator and attention): the same samples per step and
    the same loss, only slower.
  - a feature that needs another one that is off is off too.
SFTJOBS_UNVERIFIED_PATCHES=1 keeps features on for versions outside the list (one line says so; for a maintainer
trying a new release before tests/version_matrix.sh). A missing target turns its feature off whatever is set.
Pre-flight checks (``preflight.*``) are not turned off for an unverified version (they still run; a line says the
version is unverified), only when a target they import is missing.

KNOWN_BAD lists the combinations pre-flight refuses (known_bad()), each with the fix.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Versions the test tiers ran on (README, "Tested versions"). The CPU training tier (pytest -m train: real
# LLaMA-Factory training on the CPU, every speed feature's equality test) on the pinned set (transformers 5.5.4,
# torch 2.9.1), on transformers 5.6.0 (the set before the pin) and on 4.56.2 (tests/version_matrix.sh); the GPU tier
# and the benchmarks (bench/results) on torch 2.11.0+cu130 with transformers 5.6.0.
LLAMAFACTORY = ("==0.9.5",)
TRANSFORMERS = ("==4.56.2", "==5.5.4", "==5.6.0")
ACCELERATE = ("==1.11.0",)
DEEPSPEED = ("==0.19.8",)
TORCH = ("==2.9.1", "==2.11.0")  # a local label (+cu130) matches
LIGER = ("==0.8.5",)

SFT_TRAINER = "llamafactory.train.sft.trainer:CustomSeq2SeqTrainer"
COLLATOR = "llamafactory.data.collator:SFTDataCollatorWith4DAttentionMask"
UNVERIFIED_ENV = "SFTJOBS_UNVERIFIED_PATCHES"


@dataclass(frozen=True)
class Patch:
    name: str
    serves: tuple[str, ...]  # FEATURES that need it
    targets: tuple[str, ...]  # "module:attr.path": must exist (checked without calling anything)
    verified: Mapping[str, tuple[str, ...]]  # package -> specifiers (any one matching is verified)
    install: str  # where sftjobs installs it
    undo: str  # how it is undone (save()/restore() for the assigned targets)
    replaces: tuple[str, ...] = ()  # the targets install assigns
    reaches: str = ""  # what it reads at run time that only exists on instances (not resolvable on a class)


PATCHES: tuple[Patch, ...] = (
    Patch("trainer_sampler", ("speed.balance_ranks", "speed.pack_rank_samples"),
          targets=(f"{SFT_TRAINER}._get_train_sampler", "accelerate.data_loader:SeedableRandomSampler",
                   "accelerate.utils:DataLoaderConfiguration.use_seedable_sampler",
                   "accelerate.utils:DataLoaderConfiguration.data_seed", "accelerate.utils:DeepSpeedPlugin.zero_stage",
                   "torch.utils.data:RandomSampler.num_samples"),
          replaces=(f"{SFT_TRAINER}._get_train_sampler",),
          verified={"llamafactory": LLAMAFACTORY, "transformers": TRANSFORMERS, "accelerate": ACCELERATE,
                    "torch": TORCH},
          install="sftjobs.trainer.entry:install_balanced_sampler (wraps the trainer's sampler: BalancedSampler over "
                  "what accelerate would make of it, lf_train.seedable_base)",
          undo="restore CustomSeq2SeqTrainer._get_train_sampler (patches.restore)",
          reaches="trainer.accelerator.num_processes / .dataloader_config / .state.deepspeed_plugin, trainer.args, "
                  "RandomSampler._num_samples / .data_source / .replacement / .generator, model.config.hidden_size"),
    Patch("train_dataloader", ("speed.pack_rank_samples",),
          targets=(f"{SFT_TRAINER}.get_train_dataloader", "transformers:Trainer.get_train_dataloader"),
          replaces=(f"{SFT_TRAINER}.get_train_dataloader",),
          verified={"llamafactory": LLAMAFACTORY, "transformers": TRANSFORMERS},
          install="sftjobs.trainer.entry:install_packed_rows (the dataloader reads PackedRows over the tokenized set)",
          undo="restore CustomSeq2SeqTrainer.get_train_dataloader (patches.restore: deletes the override, the "
               "inherited transformers.Trainer method shows again)",
          reaches="trainer.train_dataset (swapped for the call), trainer.processing_class.pad_token_id"),
    Patch("unpadded_single_rows", ("unpadded_single_rows",),
          targets=(f"{COLLATOR}.__call__", f"{COLLATOR}.pad_to_multiple_of", f"{COLLATOR}.neat_packing",
                   f"{COLLATOR}.block_diag_attn"),
          replaces=(f"{COLLATOR}.__call__",),
          verified={"llamafactory": LLAMAFACTORY, "transformers": TRANSFORMERS},
          install="sftjobs.trainer.entry:install_unpadded_single_rows (wraps the collator's __call__)",
          undo="restore SFTDataCollatorWith4DAttentionMask.__call__ (patches.restore)"),
    Patch("idle_skip", ("speed.skip_idle_micro_steps",),
          targets=(f"{COLLATOR}.__call__", f"{SFT_TRAINER}.training_step"),
          replaces=(f"{COLLATOR}.__call__", f"{SFT_TRAINER}.training_step"),
          verified={"llamafactory": LLAMAFACTORY, "transformers": TRANSFORMERS, "accelerate": ACCELERATE,
                    "deepspeed": DEEPSPEED},
          install="sftjobs.trainer.entry:install_idle_skip (collator: a zero-length batch; training_step: no forward "
                  "or backward); relies on DeepSpeed counting the backward passes it saw (accelerate's boundary)",
          undo="restore the collator's __call__ and CustomSeq2SeqTrainer.training_step (patches.restore)",
          reaches="trainer.args.device"),
    Patch("split_halves", ("speed.split_long_samples",),
          targets=(f"{COLLATOR}.__call__", f"{SFT_TRAINER}.training_step", "torch.distributed:new_group",
                   "torch.distributed:all_gather", "torch.nn.attention.bias:causal_lower_right"),
          replaces=(f"{COLLATOR}.__call__", f"{SFT_TRAINER}.training_step"),
          verified={"llamafactory": LLAMAFACTORY, "transformers": TRANSFORMERS, "torch": TORCH,
                    "deepspeed": DEEPSPEED},
          install="sftjobs.trainer.entry:install_split_halves (collator carries the split mark; training_step hands "
                  "the pair's group to split_attention.CURRENT)",
          undo="restore the collator's __call__ and CustomSeq2SeqTrainer.training_step (patches.restore); "
               "split_attention.CURRENT = None"),
    Patch("per_sample_attention",
          ("speed.per_sample_attention", "speed.pack_rank_samples", "speed.cudnn_attention_bucket"),
          targets=("transformers:AttentionInterface.register", "transformers.masking_utils:ALL_MASK_ATTENTION_FUNCTIONS",
                   "transformers:PretrainedConfig._attn_implementation", "llamafactory.train.sft.workflow:load_model",
                   f"{COLLATOR}.__post_init__", f"{COLLATOR}.__call__", f"{COLLATOR}.attn_implementation",
                   f"{COLLATOR}.neat_packing"),
          replaces=("llamafactory.train.sft.workflow:load_model", f"{COLLATOR}.__post_init__", f"{COLLATOR}.__call__"),
          verified={"llamafactory": LLAMAFACTORY, "transformers": TRANSFORMERS, "torch": TORCH},
          install="sftjobs.trainer.attention.per_sample:install (registers sftjobs_per_sample_sdpa in transformers' "
                  "attention and mask registries, sets config._attn_implementation on the loaded model, tells the "
                  "collator to take its flash-attn path)",
          undo="restore workflow.load_model and the collator's __post_init__ / __call__ (patches.restore); the "
               "registered name stays in the registries, unused once no config names it"),
    Patch("cudnn_attention", ("speed.cudnn_attention_bucket",),
          targets=("torch.nn.attention:SDPBackend.CUDNN_ATTENTION", "torch.nn.attention:sdpa_kernel"),
          verified={"torch": TORCH},
          install="sftjobs.trainer.entry:install_cudnn_attention (per_sample_attention.CUDNN_BUCKET / CUDNN_MAX_LEN)",
          undo="per_sample_attention.CUDNN_BUCKET = 0"),
    Patch("lean_zero_step", ("speed.lean_zero_step",),
          targets=("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer.get_grad_norm_direct",
                   "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer.check_overflow",
                   "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer.step",
                   "deepspeed.runtime.zero.stage_1_and_2:mask_nan_or_inf_with_val_inplace",
                   "deepspeed.runtime.zero.stage_1_and_2:dist.all_reduce",
                   "deepspeed.runtime.constants:PIPE_REPLICATED", "torch:_foreach_norm"),
          replaces=("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer.get_grad_norm_direct",
                    "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer.check_overflow"),
          verified={"deepspeed": DEEPSPEED, "torch": TORCH},
          install="sftjobs.trainer.lean_zero_step:install (one multi-tensor gradient norm; the bf16 overflow pass "
                  "left to step()'s check of that norm)",
          undo="restore DeepSpeedZeroOptimizer.get_grad_norm_direct / check_overflow (patches.restore)",
          reaches="the optimizer's dtype, compute_grad_norm, cpu_offload, model_parallel_rank, dp_process_group"),
    Patch("fused_zero_update", ("speed.fused_zero_update",),
          targets=("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer.step",
                   "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer.scaled_global_norm",
                   "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer.flatten_dense_tensors_aligned",
                   "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer._get_preflattened_grad_partition",
                   "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer._release_preflattened_grad_buffers",
                   "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state",
                   "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer._update_model_bit16_weights",
                   "deepspeed.runtime.zero.stage_1_and_2:all_gather_dp_groups",
                   "deepspeed.runtime.zero.stage_1_and_2:OPTIMIZER_TIMERS",
                   "deepspeed.runtime.zero.stage_1_and_2:INITIAL_MICRO_STEP_ID",
                   "deepspeed.runtime.utils:is_invalid_grad_norm", "torch.optim:AdamW"),
          replaces=("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer.step",),
          verified={"deepspeed": DEEPSPEED, "torch": TORCH},
          install="sftjobs.trainer.fused_zero_update:install (DeepSpeed's step with the update of each partition "
                  "in one Triton kernel; DeepSpeed's own step where it does not apply)",
          undo="restore DeepSpeedZeroOptimizer.step (patches.restore)",
          reaches="the optimizer's dtype, cpu_offload, compute_grad_norm, clip_grad, loss_scale, the base "
                  "optimizer's param_groups and state, single_partition_of_fp32_groups, "
                  "parallel_partitioned_bit16_groups, averaged_gradients, partition_size, real_dp_process_group"),
    Patch("liger_loss_chunks", ("speed.liger_chunk_mem_const",),
          targets=("liger_kernel.transformers.functional:liger_fused_linear_cross_entropy",
                   "liger_kernel.transformers.model.loss_utils:F.liger_fused_linear_cross_entropy",
                   "liger_kernel.ops.fused_linear_cross_entropy:fused_linear_cross_entropy_forward"),
          replaces=("liger_kernel.transformers.functional:liger_fused_linear_cross_entropy",),
          verified={"liger_kernel": LIGER},
          install="sftjobs.trainer.liger_loss_chunks:install (Liger's functional fused linear cross-entropy with "
                  "another default chunk_mem_const)",
          undo="restore liger_kernel.transformers.functional.liger_fused_linear_cross_entropy (patches.restore)",
          reaches="the chunk_mem_const parameter of liger_fused_linear_cross_entropy (liger_kernel >= 0.8.5)"),
    Patch("recompute_by_length", ("speed.recompute_by_length",),
          targets=("transformers.modeling_layers:GradientCheckpointingLayer.__call__",
                   "transformers:TrainerCallback.on_train_begin"),
          verified={"transformers": TRANSFORMERS, "torch": TORCH},
          install="sftjobs.trainer.recompute_by_length:callback (a forward pre-hook on the model sets each decoder "
                  "layer's gradient_checkpointing flag per micro-batch)",
          undo="at the end of training the hook's handle.remove() and every layer's flag back to True",
          reaches="GradientCheckpointingLayer.gradient_checkpointing (an instance attribute LLaMA-Factory sets)"),
    Patch("loader_workers_survive_sigterm", ("signal_save.loader_workers",),
          targets=("transformers.trainer:seed_worker", "transformers:Trainer.get_train_dataloader"),
          replaces=("transformers.trainer:seed_worker",),
          # 5.5.4: the CPU tiers and the GPU requeue benchmark (4 loader workers). 4.56.2: the signal-save and
          # tracking train tests (a SIGTERM to every process, loader workers on) with SFTJOBS_UNVERIFIED_PATCHES=1
          verified={"transformers": ("==4.56.2", "==5.5.4"), "torch": TORCH},
          install="sftjobs.trainer.signal_save:keep_loader_workers_on_sigterm (the Trainer's worker_init_fn ignores "
                  "SIGTERM first: torch's loader workers die of a SIGTERM that is not their parent's, and a "
                  "preemption sends it to every process of the job)",
          undo="restore transformers.trainer.seed_worker (patches.restore)"),
    Patch("preflight_loaders", ("preflight.data",),
          targets=("llamafactory.data.loader:_load_single_dataset", "llamafactory.data.loader:_get_dataset_processor",
                   "llamafactory.data.parser:get_dataset_list", "llamafactory.extras.constants:FILEEXT2TYPE",
                   "llamafactory.data:get_template_and_fix_tokenizer", "llamafactory.model:load_tokenizer"),
          verified={"llamafactory": LLAMAFACTORY, "transformers": TRANSFORMERS},
          install="sftjobs.steps.preflight:check_data (LLaMA-Factory's private single-dataset loader on a sample)",
          undo="nothing is assigned"),
    Patch("preflight_deepspeed", ("preflight.deepspeed",),
          targets=("transformers.integrations.deepspeed:unset_hf_deepspeed_config",
                   "transformers.integrations.deepspeed:HfTrainerDeepSpeedConfig.trainer_config_finalize",
                   "deepspeed.runtime.config:DeepSpeedConfig",
                   "deepspeed.runtime.zero.stage3:estimate_zero3_model_states_mem_needs",
                   "deepspeed.runtime.zero.stage_1_and_2:estimate_zero2_model_states_mem_needs"),
          verified={"transformers": TRANSFORMERS, "deepspeed": DEEPSPEED},
          install="sftjobs.steps.preflight:check_deepspeed_config / estimate_model_states",
          undo="nothing is assigned; unset_hf_deepspeed_config drops the process-wide config it registers and the "
               "environment variables TrainingArguments sets (transformers 4: ACCELERATE_USE_DEEPSPEED) are put back "
               "(preflight._leaving_no_trace)",
          reaches="TrainingArguments.hf_deepspeed_config (an instance attribute)"),
)


@dataclass(frozen=True)
class Feature:
    name: str
    cost: str  # what running stock instead costs (bench/results)
    needs: tuple[str, ...] = ()  # features that must be on too


FEATURES: dict[str, Feature] = {f.name: f for f in (
    Feature("unpadded_single_rows", "one-row batches padded to a multiple of 8 take SDPA off its causal flash kernel "
            "(bench/results: +26% for prod unpadded)"),
    Feature("speed.balance_ranks", "~1.10x slower: GPUs wait for the one with the longest samples (bench/results: "
            "+9.9% in one call)"),
    Feature("speed.per_sample_attention", "LLaMA-Factory's 4D block-diagonal mask instead: 26 ms vs 3 ms per layer "
            "for a 15000-token pack of 4 samples on an H100"),
    Feature("speed.pack_rank_samples", "~1.10x slower (bench/results: +10.3% on 4x H200); balance_ranks alone "
            "where it is set"),
    Feature("speed.skip_idle_micro_steps", "~1.3x slower (4x H200: 13,460 vs 10,370 tok/s/GPU)",
            needs=("speed.pack_rank_samples",)),
    Feature("speed.split_long_samples", "~4% slower on 4x H100 (slowest GPU 1.09x -> 1.35x the mean, 4x2)",
            needs=("speed.pack_rank_samples",)),
    Feature("speed.cudnn_attention_bucket", "flash instead of cuDNN for single samples: ~1.12x slower (fast on "
            "4x H200: 19,599 vs 17,548 tok/s/GPU)"),
    Feature("speed.lean_zero_step", "DeepSpeed's per-parameter norm and overflow passes (~3,900 launches per "
            "optimizer step with the 3B model on one GPU; bench/results)"),
    Feature("speed.fused_zero_update", "DeepSpeed's update of the partition in five passes over memory (fp32 "
            "gradient cast, clip, AdamW, copy to bf16) and a 12 GB fp32 gradient per step with the 3B model"),
    Feature("speed.liger_chunk_mem_const", "Liger's fused cross-entropy in its default chunks (128-256 tokens "
            "with Qwen2.5's vocabulary: ~59 passes over the lm_head's 0.6 GB weight gradient per micro-step)"),
    Feature("speed.recompute_by_length", "every decoder layer recomputed for every micro-batch, about a third "
            "more compute where the plan picks recompute"),
    Feature("signal_save.loader_workers", "a SIGTERM sent to every process (preemption, scontrol requeue) kills "
            "the data loader workers: the run resumes from the last periodic checkpoint instead of the signal's "
            "step (USR2, the time limit's signal, still saves)"),
    Feature("preflight.data", "the data check (LLaMA-Factory's loader on a sample) is skipped"),
    Feature("preflight.deepspeed", "DeepSpeed's config and memory checks may fail with a library error"),
)}


@dataclass
class Decision:
    feature: str
    on: bool
    why: str = ""
    cost: str = ""
    notes: list[str] = field(default_factory=list)  # what was let through (unverified, with SFTJOBS_UNVERIFIED_PATCHES)

    def line(self) -> str:
        if self.on:
            return f"{self.feature} on" + (f" ({'; '.join(self.notes)})" if self.notes else "")
        if self.feature.startswith("preflight."):
            return f"{self.feature} off: {self.why}; {self.cost}"
        return f"{self.feature} off: {self.why}; runs stock, {self.cost}"

    def as_dict(self) -> dict[str, Any]:
        return {"on": self.on, "why": self.why or None, "cost": self.cost if not self.on else None,
                "notes": list(self.notes), "line": self.line()}


# ----------------------------------------------------------------------------- versions and targets


def installed_version(package: str) -> str | None:
    """The installed distribution's version (metadata only, nothing imported); None when not installed.
    Tests replace this to simulate another version."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def version_matches(version: str, specifiers: Iterable[str]) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        parsed = Version(version)
    except InvalidVersion:
        return False
    return any(SpecifierSet(spec).contains(parsed, prereleases=True) for spec in specifiers)


def _split(target: str) -> tuple[str, list[str]]:
    module, _, path = target.partition(":")
    return module, [part for part in path.split(".") if part]


def _lookup(obj: Any, name: str) -> Any:
    if hasattr(obj, name):
        return getattr(obj, name)
    if isinstance(obj, type) and dataclasses.is_dataclass(obj) and name in {f.name for f in dataclasses.fields(obj)}:
        return dataclasses.MISSING  # a dataclass field without a default: exists on every instance
    raise AttributeError(name)


def missing_target(target: str) -> str | None:
    """Why ``target`` cannot be resolved (its module does not import, or an attribute on the path is not there);
    None when it exists. Imports the module and looks attributes up; nothing is called."""
    module, path = _split(target)
    try:
        obj = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - ImportError or an error inside the module: it cannot be patched
        return f"{module} does not import ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    for i, name in enumerate(path):
        try:
            obj = _lookup(obj, name)
        except AttributeError:
            where = ".".join([module.rsplit(".", 1)[-1], *path[:i]]) if i else module
            return f"{module}:{'.'.join(path)} does not exist ({where} has no {name})"
    return None


def _version_problems(patch: Patch, versions: Mapping[str, str | None] | None) -> list[str]:
    problems = []
    for package, specs in patch.verified.items():
        version = versions.get(package) if versions is not None and package in versions else installed_version(package)
        if version is None:  # not installed: nothing of it is reached (a target in it is caught as missing)
            continue
        if not version_matches(version, specs):
            problems.append(f"{package} {version} not verified (verified: {', '.join(specs)})")
    return problems


def check_patch(patch: Patch, versions: Mapping[str, str | None] | None = None,
                resolve_targets: bool = True) -> dict[str, list[str]]:
    """{"versions": [...], "targets": [...]}: what is wrong with ``patch`` here (empty lists: supported)."""
    found = {"versions": _version_problems(patch, versions), "targets": []}
    if resolve_targets:
        found["targets"] = [why for why in map(missing_target, patch.targets) if why]
    return found


def decide(features: Iterable[str], versions: Mapping[str, str | None] | None = None,
           log: Callable[[str], None] | None = None) -> dict[str, Decision]:
    """Which of ``features`` run here; logs one line per feature turned off (and per unverified one let through).

    ``versions`` (package -> version) overrides the installed ones; targets are only resolved for patches whose
    versions are verified (or let through), so an unverified environment costs no imports."""
    trust = os.environ.get(UNVERIFIED_ENV, "") not in ("", "0")
    wanted = [name for name in FEATURES if name in set(features)]  # FEATURES order: a feature after what it needs
    unknown = sorted(set(features) - set(FEATURES))
    if unknown:
        raise ValueError(f"unknown features {unknown}; known: {sorted(FEATURES)}")
    checked: dict[str, dict[str, list[str]]] = {}
    decisions: dict[str, Decision] = {}
    for name in wanted:
        feature = FEATURES[name]
        decision = Decision(name, True, cost=feature.cost)
        for patch in (p for p in PATCHES if name in p.serves):  # its own patches first, then what it needs
            if not decision.on:
                break
            if patch.name not in checked:
                versions_wrong = _version_problems(patch, versions)
                let_through = trust or name.startswith("preflight.")
                resolve = not versions_wrong or let_through
                checked[patch.name] = {"versions": versions_wrong,
                                       "targets": check_patch(patch, versions, resolve_targets=resolve)["targets"]
                                       if resolve else []}
            found = checked[patch.name]
            if found["targets"]:
                decision.on, decision.why = False, f"patch {patch.name}: {found['targets'][0]}"
            elif found["versions"]:
                if trust or name.startswith("preflight."):
                    decision.notes += [f"{why} ({'runs anyway: ' + UNVERIFIED_ENV if trust else 'runs anyway'})"
                                       for why in found["versions"] if why not in decision.notes]
                else:
                    decision.on, decision.why = False, found["versions"][0]
        off_needs = [need for need in feature.needs if need in decisions and not decisions[need].on]
        absent_needs = [need for need in feature.needs if need not in decisions]
        if decision.on and (off_needs or absent_needs):
            decision.on = False
            decision.why = (f"needs {', '.join(off_needs)}, which is off" if off_needs
                            else f"needs {', '.join(absent_needs)}, which is not asked for")
        decisions[name] = decision
        if log is not None and (not decision.on or decision.notes):
            log(decision.line())
    return decisions


def speed_features(speed: Mapping[str, Any] | None) -> list[str]:
    """The features a profile's ``speed`` section (or lf_train's options) asks for, plus the always-on one."""
    asked = [f"speed.{key}" for key, value in (speed or {}).items() if value and f"speed.{key}" in FEATURES]
    return ["unpadded_single_rows", *asked]


def switch_off(opts: Any, decisions: Mapping[str, Decision]) -> None:
    """Clear lf_train's option for every speed feature that is off (``speed.X`` is ``opts.X``)."""
    for name, decision in decisions.items():
        attr = name.removeprefix("speed.")
        if not decision.on and name.startswith("speed.") and hasattr(opts, attr):
            setattr(opts, attr, type(getattr(opts, attr))())  # False / 0


# ----------------------------------------------------------------------------- undo


def save(names: Iterable[str] | None = None) -> list[tuple[Any, str, Any]]:
    """The current values of the targets the named patches (default: all) assign, for restore()."""
    saved, seen = [], set()
    for patch in PATCHES:
        if names is not None and patch.name not in set(names):
            continue
        for target in patch.replaces:
            if target in seen:
                continue
            seen.add(target)
            module, path = _split(target)
            owner = importlib.import_module(module)
            for part in path[:-1]:
                owner = getattr(owner, part)
            own = vars(owner) if isinstance(owner, type) else owner.__dict__
            saved.append((owner, path[-1], own.get(path[-1], dataclasses.MISSING)))
    return saved


def restore(saved: list[tuple[Any, str, Any]]) -> None:
    """Put back what save() recorded: an attribute that was inherited is deleted again."""
    for owner, attr, value in reversed(saved):
        if value is dataclasses.MISSING:
            if attr in vars(owner):
                delattr(owner, attr)
        else:
            setattr(owner, attr, value)


# ----------------------------------------------------------------------------- known-bad combinations


@dataclass(frozen=True)
class KnownBad:
    name: str
    why: str
    fix: str
    applies: Callable[[Mapping[str, Any]], bool]  # over {"versions": {...}, "flash_attn": ..., "speed": {...}, ...}


def _fa2_on_transformers_560(run: Mapping[str, Any]) -> bool:
    versions, speed = run.get("versions") or {}, run.get("speed") or {}
    # flash_attn auto leaves the choice to transformers, which takes SDPA (LLaMA-Factory turns auto into fa2 only
    # for gemma2). pack_rank_samples puts sftjobs' per-sample attention on the model instead of FlashAttention-2.
    return (versions.get("transformers") == "5.6.0" and bool(versions.get("flash_attn"))
            and run.get("flash_attn") == "fa2" and not speed.get("pack_rank_samples"))


KNOWN_BAD: tuple[KnownBad, ...] = (
    KnownBad("fa2_transformers_5.6.0",
             "train.flash_attn fa2 with flash-attn installed and transformers 5.6.0: transformers' FlashAttention-2 "
             "forward fails at the first step (AttributeError: 'NoneType' object has no attribute 'to', on s_aux; "
             "LLaMA-Factory issue #10610, fixed by transformers PR #45589 in 5.6.1)",
             "install the pinned transformers on the nodes (pip install 'transformers==5.5.4', what sftjobs[train] "
             "installs) or set train.flash_attn: sdpa in the profile",
             _fa2_on_transformers_560),
)


def known_bad(run: Mapping[str, Any]) -> list[KnownBad]:
    return [rule for rule in KNOWN_BAD if rule.applies(run)]


def deepspeed_op_problems(deepspeed: str, probe: Callable[[], dict[str, Any]] | None = None) -> tuple[list[str], dict]:
    """For a DeepSpeed stage that builds ops at run time (ZeRO offload: cpu_adam), what stops the build here, from
    DeepSpeed's own op builder (compatibility, CUDA toolkit against torch's CUDA) and the JIT tools (ninja, a C++
    compiler). ([problem with fix, ...], the probe's findings); nothing is compiled."""
    if not deepspeed.endswith("_offload"):
        return [], {"skipped": f"deepspeed {deepspeed} builds no op at run time"}
    info = (probe or probe_cpu_adam)()
    problems = []
    if info.get("installed"):
        return [], info
    if info.get("error"):
        problems.append(f"DeepSpeed's op builder cannot check cpu_adam ({info['error']}); run ds_report on the node")
    if info.get("compatible") is False:
        problems.append("DeepSpeed's op builder reports cpu_adam as not compatible with this machine (ds_report "
                        "shows why); install deepspeed with DS_BUILD_CPU_ADAM=1, or use deepspeed: z2/z3 without offload")
    if info.get("cuda_mismatch"):
        problems.append(f"{info['cuda_mismatch']}: install the CUDA toolkit matching torch's CUDA "
                        f"{info.get('torch_cuda')} (CUDA_HOME), set DS_SKIP_CUDA_CHECK=1 in launcher.setup (DeepSpeed "
                        "then builds anyway), or use deepspeed: z2/z3 without offload")
    if info.get("ninja") is False:
        problems.append("ninja is not installed for the nodes' python (DeepSpeed JIT-builds cpu_adam with it): "
                        "pip install ninja")
    if info.get("cxx") is None:
        problems.append("no C++ compiler (c++/g++) on PATH to build cpu_adam: install one on the nodes "
                        "(e.g. apt-get install g++)")
    return problems, info


def probe_cpu_adam() -> dict[str, Any]:
    """DeepSpeed's view of cpu_adam here: prebuilt, compatible, the CUDA toolkit against torch's CUDA."""
    import shutil

    info: dict[str, Any] = {"op": "cpu_adam", "cxx": shutil.which("c++") or shutil.which("g++")}
    try:
        import torch
        import torch.utils.cpp_extension as cpp
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops

        info["installed"] = bool(installed_ops.get("cpu_adam"))
        info["torch_cuda"] = torch.version.cuda
        info["ninja"] = bool(cpp.is_ninja_available())
        accelerator = get_accelerator()
        info["accelerator"] = accelerator.device_name()
        builder = accelerator.create_op_builder("CPUAdamBuilder")
        info["compatible"] = bool(builder.is_compatible(verbose=False)) if builder is not None else False
        if torch.version.cuda and accelerator.device_name() == "cuda":
            from deepspeed.ops.op_builder.builder import (
                CUDAMismatchException,
                MissingCUDAException,
                assert_no_cuda_mismatch,
            )

            try:
                assert_no_cuda_mismatch("cpu_adam")
            except MissingCUDAException as exc:
                info["nvcc"] = f"none ({exc}): cpu_adam builds for the CPU only"
            except CUDAMismatchException as exc:
                info["cuda_mismatch"] = " ".join(str(exc).split())
    except Exception as exc:  # noqa: BLE001 - the probe's own failure is the finding
        info["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return info

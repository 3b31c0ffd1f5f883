"""The validated profile as typed objects, one dataclass per section (as LLaMA-Factory's hparams).

``Profile.values`` stays the nested dict that profile.yaml, plan.json and config_hash record; these are its
typed views, built once per profile from the validated values (every default filled in), so code reads
``profile.resources.gpus_per_node`` instead of string keys. tests/test_profile_spec.py checks that every key
of profile.SCHEMA has its field here, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    source: str                   # hub | path | synthetic
    hub_id: str | None
    revision: str | None
    local_dir: str | None         # where a hub model is downloaded to
    path: str | None              # source: path
    synthetic_shape: str          # source: synthetic


@dataclass(frozen=True)
class DataSpec:
    source: str                   # hub | path | synthetic
    hub_repo: str | None
    hub_file: str | None
    revision: str | None
    path: str | None
    synthetic_rows: int
    dir: str                      # where the validated data set and its toy subset are written
    shape: str                    # sharegpt | alpaca | auto
    dataset: str                  # which registered data set the full run trains on (sftjobs.datasets)
    toy_samples: int
    max_bad_fraction: float


@dataclass(frozen=True)
class DryRunSpec:
    max_samples: int


@dataclass(frozen=True)
class BatchSpec:
    global_size: int | None       # samples per optimizer step over all GPUs; None keeps bs x ga


@dataclass(frozen=True)
class ResourcesSpec:
    executor: str
    partition: str | None
    account: str | None
    qos: str | None
    constraint: str | None
    nodes: int
    gpus_per_node: int
    max_gpus_per_node: int
    gpu_memory_gib: float
    cpus_per_task: int | None
    mem: str | None
    time: str | int | None
    sbatch_extra: tuple[str, ...]
    mail_type: str | None
    mail_user: str | None
    signal_delay_s: int
    max_time_requeues: int
    local_trainings: int
    cpu_step_cpus: int
    cpu_step_mem: str | None
    cpu_step_time: str | int | None

    @property
    def world_size(self) -> int:
        """Training processes: nodes x GPUs per node (one process for a CPU run)."""
        return self.nodes * max(self.gpus_per_node, 1)


@dataclass(frozen=True)
class LauncherSpec:
    python: str | None
    setup: tuple[str, ...]
    master_port_base: int


@dataclass(frozen=True)
class SpeedSpec:
    balance_ranks: bool
    per_sample_attention: bool
    pack_rank_samples: bool
    skip_idle_micro_steps: bool
    split_long_samples: bool
    cudnn_attention_bucket: int
    lean_zero_step: bool
    fused_zero_update: bool
    zero1_gradients_in_place: bool
    liger_chunk_mem_const: int
    recompute_by_length: bool


@dataclass(frozen=True)
class ProfileSpec:
    description: str
    output_dir: str
    deepspeed: str
    tracking: str                 # none | tensorboard | wandb (sftjobs.planning.tracking)
    model: ModelSpec
    data: DataSpec
    dry_run: DryRunSpec
    batch: BatchSpec
    resources: ResourcesSpec
    launcher: LauncherSpec
    speed: SpeedSpec
    train: dict[str, Any] = field(default_factory=dict)  # LLaMA-Factory's own keys, passed through


SECTIONS: dict[str, type] = {"model": ModelSpec, "data": DataSpec, "dry_run": DryRunSpec, "batch": BatchSpec,
                             "resources": ResourcesSpec, "launcher": LauncherSpec, "speed": SpeedSpec}


def _section(cls: type, values: dict[str, Any]) -> Any:
    kwargs = {f.name: values[f.name] for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})


def spec_of(values: dict[str, Any]) -> ProfileSpec:
    """The typed view of validated profile values (KeyError: a schema key without its field, a bug)."""
    sections = {name: _section(cls, values[name]) for name, cls in SECTIONS.items()}
    return ProfileSpec(description=values["description"], output_dir=values["output_dir"],
                       deepspeed=values["deepspeed"], tracking=values["tracking"], train=dict(values["train"]), **sections)

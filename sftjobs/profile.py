"""Stage profiles: configs/<name>.yaml (+ ``extends:`` + ``--set key=value``) -> a validated Profile.

Every mistake a user can make in a profile is caught here, before anything is rendered or queued,
with the file, the dotted key and what to do.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sftjobs.datasets import DATASET_NAMES
from sftjobs.errors import SftjobsError
from sftjobs.fsutil import SNIFF_BYTES, not_utf8_advice, sniff_not_utf8
from sftjobs.planning.batch import global_size_problem
from sftjobs.planning.tracking import TRACKING_CHOICES
from sftjobs.resources import shipped_dir
from sftjobs.spec import ProfileSpec, spec_of

DEEPSPEED_CHOICES = ("none", "z0", "z1", "z2", "z2_offload", "z3", "z3_offload", "auto")
EXECUTOR_CHOICES = ("auto", "slurm", "local", "debug")
SOURCE_CHOICES = ("hub", "path", "synthetic")
SHAPE_CHOICES = ("sharegpt", "alpaca", "auto")
# Slurm --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_MEM_RE = re.compile(r"^\d+[KMGT]?$")
_SCI_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


@dataclass(frozen=True)
class Key:
    """One profile key: its type, default and an optional extra check returning an error or None."""

    type: type | tuple[type, ...]
    default: Any
    check: Callable[[Any], str | None] | None = None
    help: str = ""


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or v >= low else f"must be >= {low:g}"


def _time(v: Any) -> str | None:
    return None if v is None or _TIME_RE.fullmatch(str(v)) else "must be a Slurm time like 02:00:00, 90 or 1-12:00:00"


def _mem(v: Any) -> str | None:
    return None if v is None or _MEM_RE.fullmatch(str(v)) else "must be a Slurm memory size like 64G or 16000M"


# Values that become #SBATCH lines: sbatch reads those line by line, so a newline or quote would end the
# directive early and leave the rest to the shell. Slurm names never need them. fullmatch, not match: "$" also
# matches before a trailing newline.
_SBATCH_TOKEN = re.compile(r"^[A-Za-z0-9_.,:=+@%/\[\]&|!*-]+$")


def _sbatch_token(v: Any) -> str | None:
    return None if v is None or _SBATCH_TOKEN.fullmatch(str(v)) else "may hold only letters, digits and _.,:=+@%/[]&|!*- (no spaces, quotes or newlines)"


def _sbatch_flags(v: Any) -> str | None:
    for flag in v:
        if not isinstance(flag, str) or not flag.startswith("--") or not _SBATCH_TOKEN.fullmatch(flag):
            return f"must be a list of --flag or --flag=value strings without spaces, quotes or newlines ({flag!r})"
    return None


def _shell_lines(v: Any) -> str | None:
    for n, line in enumerate(v, 1):
        if not isinstance(line, str):
            return f"must be a list of shell lines (strings); entry {n} is {line!r}"
        if any(c in line for c in "\n\r\0"):
            return (f"entry {n} holds a newline, carriage return or NUL ({line!r}); each entry is one shell line: "
                    "put each line in an entry of its own")
    return None


# sbatch --mail-type's values (Slurm 22.05 man page); a comma list of them
MAIL_TYPES = ("NONE", "BEGIN", "END", "FAIL", "REQUEUE", "ALL", "INVALID_DEPEND", "STAGE_OUT", "TIME_LIMIT",
              "TIME_LIMIT_90", "TIME_LIMIT_80", "TIME_LIMIT_50", "ARRAY_TASKS")
# A user name or a mail address: nothing a shell, sbatch's #SBATCH reader or a mail program would read otherwise.
_MAIL_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*(@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*)?")


def _mail_type(v: Any) -> str | None:
    if v is None:
        return None
    types = str(v).split(",")
    bad = [t for t in types if t not in MAIL_TYPES]
    if bad:
        return (f"must be a comma list of Slurm's --mail-type values ({', '.join(MAIL_TYPES)}); "
                f"{bad[0]!r} is not one")
    if "NONE" in types and len(types) > 1:
        return "NONE turns mail off: it cannot be combined with other types"
    return None


def _mail_user(v: Any) -> str | None:
    if v is None or (len(v) <= 254 and _MAIL_USER.fullmatch(v)):
        return None
    return ("must be a user name or one mail address (letters, digits, . _ + - and one @domain; no spaces, quotes, "
            "shell characters or control characters)")


def _fraction(v: Any) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must be between 0 and 1"


OPT_STR = (str, type(None))
SCHEMA: dict[str, Key] = {
    "description": Key(str, ""),
    "extends": Key(OPT_STR, None, help="parent profile (name or path)"),
    "output_dir": Key(str, None, help="checkpoints; {run_id} in it gives every run its own folder"),
    "deepspeed": Key(str, "none", _choice(DEEPSPEED_CHOICES),
                     "ZeRO stage; auto: the fastest stage and recompute setting that fit (sftjobs/planning/memory.py)"),
    "tracking": Key(str, "none", _choice(TRACKING_CHOICES),
                    "experiment tracking of the training steps: tensorboard (logs in the run directory's "
                    "tensorboard/) or wandb (mode, project and key from the job's environment; one W&B run per "
                    "training step, continued by every requeue and resume)"),
    "model.source": Key(str, "hub", _choice(SOURCE_CHOICES)),
    "model.hub_id": Key(OPT_STR, None),
    "model.revision": Key(OPT_STR, None),
    "model.local_dir": Key(OPT_STR, None),
    "model.path": Key(OPT_STR, None),
    "model.synthetic_shape": Key(str, "tiny", _choice(("tiny", "qwen2.5-0.5b", "qwen2.5-3b")),
                                 "model.source synthetic: a tiny model, or random weights of a real shape (GPU benchmarks)"),
    "data.source": Key(str, "hub", _choice(SOURCE_CHOICES)),
    "data.hub_repo": Key(OPT_STR, None),
    "data.hub_file": Key(OPT_STR, None),
    "data.revision": Key(OPT_STR, None),
    "data.path": Key(OPT_STR, None),
    "data.synthetic_rows": Key(int, 200, _at_least(1)),
    "data.dir": Key(str, "./data"),
    "data.shape": Key(str, "sharegpt", _choice(SHAPE_CHOICES)),
    "data.dataset": Key(str, "arpo_sft_toy", _choice(DATASET_NAMES)),
    "data.toy_samples": Key(int, 500, _at_least(1)),
    "data.max_bad_fraction": Key((int, float), 0.001, _fraction),
    "dry_run.max_samples": Key(int, 1000, _at_least(1)),
    "batch.global_size": Key((int, type(None)), None, _at_least(1),
                             "samples per optimizer step across all GPUs; null keeps the profile's "
                             "per_device_train_batch_size x gradient_accumulation_steps"),
    "resources.executor": Key(str, "auto", _choice(EXECUTOR_CHOICES)),
    "resources.partition": Key(OPT_STR, None, _sbatch_token),
    "resources.account": Key(OPT_STR, None, _sbatch_token),
    "resources.qos": Key(OPT_STR, None, _sbatch_token),
    "resources.constraint": Key(OPT_STR, None, _sbatch_token),
    "resources.nodes": Key(int, 1, _at_least(1)),
    "resources.gpus_per_node": Key(int, 1, _at_least(0)),
    "resources.max_gpus_per_node": Key(int, 8, _at_least(1), "GPUs one node of the cluster has"),
    "resources.gpu_memory_gib": Key((int, float), 80, lambda v: None if v > 0 else "must be > 0",
                                    "memory of one GPU, for deepspeed: auto"),
    "resources.cpus_per_task": Key((int, type(None)), 8, _at_least(1),
                                   "CPUs of a GPU step; null: Slurm's default (a whole-node step gets every CPU)"),
    "resources.mem": Key(OPT_STR, "64G", _mem, "memory per node of a GPU step; null: Slurm's default (a whole-node "
                         "step, gpus_per_node = max_gpus_per_node, gets --mem=0: all of the node's memory)"),
    "resources.time": Key((str, int, type(None)), "24:00:00", _time),
    "resources.sbatch_extra": Key(list, [], _sbatch_flags),
    "resources.signal_delay_s": Key(int, 120, _at_least(0), "USR2 this many seconds before the time limit (requeue)"),
    "resources.max_time_requeues": Key(int, 10, _at_least(0), "times a training step may reach its time limit and "
                                       "requeue itself (resuming from its checkpoint) before it fails"),
    "resources.local_trainings": Key(int, 1, _at_least(1), "local executor: how many trainings of this user may run "
                                     "at once on this machine; the others wait for a slot (PENDING)"),
    "resources.mail_type": Key(OPT_STR, None, _mail_type, "sbatch --mail-type of the chain's last step (END,FAIL "
                               "when only mail_user is set); every other step mails on FAIL"),
    "resources.mail_user": Key(OPT_STR, None, _mail_user, "sbatch --mail-user (default: Slurm mails the submitter)"),
    "resources.cpu_step_cpus": Key(int, 4, _at_least(1), "CPUs for the data and model steps"),
    "resources.cpu_step_mem": Key(OPT_STR, "16G", _mem),
    "resources.cpu_step_time": Key((str, int, type(None)), "04:00:00", _time),
    "launcher.python": Key(OPT_STR, None, help="python on the nodes (default: the one running sftjobs)"),
    "launcher.setup": Key(list, [], _shell_lines, help="shell lines run before each step (module load, source venv)"),
    "launcher.master_port_base": Key(int, 20000, _at_least(1024)),
    "speed.balance_ranks": Key(bool, False, help="spread each optimizer step's samples over the GPUs by length "
                               "(the same samples per step; less waiting for the longest one)"),
    "speed.per_sample_attention": Key(bool, False, help="neat_packing without flash-attn: causal SDPA per packed "
                                      "sample instead of a 4D block-diagonal mask"),
    "speed.pack_rank_samples": Key(bool, False, help="balance_ranks, with each GPU's samples of a step packed into "
                                   "sample-isolated rows (the same samples per step; a GPU may take one long sample "
                                   "or several short ones)"),
    "speed.skip_idle_micro_steps": Key(bool, False, help="with pack_rank_samples: a micro-step with nothing to "
                                       "compute on any GPU runs no forward or backward (instead of a one-token row)"),
    "speed.split_long_samples": Key(bool, False, help="with pack_rank_samples: a step's longest sample, where it "
                                    "costs more than a GPU's share, is split over a pair of GPUs (attention "
                                    "across the pair; the same loss and gradients)"),
    "speed.lean_zero_step": Key(bool, False, help="DeepSpeed ZeRO-1/2: the gradient norm in one multi-tensor "
                                "call and no separate bf16 overflow pass (a non-finite norm still skips the "
                                "step); the same updates, fewer kernel launches per optimizer step"),
    "speed.fused_zero_update": Key(bool, False, help="DeepSpeed ZeRO-1/2 in bf16 with torch's AdamW: the update of "
                                   "the optimizer's partition (bf16 gradient, clip, AdamW on the fp32 master "
                                   "weights, bf16 weights) in one pass over memory instead of five; the same "
                                   "update and optimizer state"),
    "speed.zero1_gradients_in_place": Key(bool, False, help="DeepSpeed ZeRO-1: gradients stay where autograd "
                                          "accumulates them until the optimizer step's reduction "
                                          "(contiguous_gradients: false at stage 1), so DeepSpeed hooks no "
                                          "parameter in every backward and copies no gradient twice at the "
                                          "boundary; the same reduction and update. On 1 H100: fast +3.9%, prod "
                                          "no gain; on several GPUs the boundary all-reduces (about twice the "
                                          "traffic), not measured"),
    "speed.recompute_by_length": Key(bool, False, help="where the memory plan picks recompute: each micro-batch "
                                     "recomputes only as many decoder layers as its own length needs to fit (the "
                                     "plan's estimate, per token count), instead of every layer for every "
                                     "micro-batch; the same loss and gradients"),
    "speed.liger_chunk_mem_const": Key(int, 0, _at_least(0), help="with train.enable_liger_kernel: Liger's fused "
                                       "linear cross-entropy walks the tokens in chunks whose logits stay within "
                                       "this many x tokens x hidden elements (Liger's chunk_mem_const); larger = "
                                       "fewer, larger chunks, fewer passes over the lm_head's weight gradient, "
                                       "more transient memory; 0 = Liger's default (1); no effect without Liger"),
    "speed.cudnn_attention_bucket": Key(int, 0, _at_least(0), help="with per_sample_attention or pack_rank_samples "
                                        "on a GPU: a packed sample with its own attention call runs cuDNN's kernel, "
                                        "padded at its end to a multiple of this many tokens (cuDNN builds one graph "
                                        "per padded length, all at the start); 0 = torch's pick (flash with prod's "
                                        "launcher.setup)"),
    "train": Key(dict, {}, help="LLaMA-Factory keys, passed through"),
}
SECTIONS = {k.split(".")[0] for k in SCHEMA if "." in k}
# Keys naming a path, a program or a hub file: an empty value (`--set output_dir=` with an unset shell variable)
# would silently mean the current directory, so it is refused rather than taken.
NONBLANK_KEYS = ("output_dir", "model.hub_id", "model.revision", "model.local_dir", "model.path", "data.hub_repo",
                 "data.hub_file", "data.revision", "data.path", "data.dir", "launcher.python")
# The profile's file name becomes the run id, the run directory's name, the Slurm job name and a comment in
# every rendered file: it is refused unless it is made of these (what Slurm users name jobs with anyway).
PROFILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")
PROFILE_NAME_RULE = ("letters, digits and . _ - (matching [A-Za-z0-9._-], not starting with '-' or '.', "
                     "at most 100 characters)")

# LLaMA-Factory keys that sftjobs owns: a profile sets them through its own keys instead.
MANAGED_TRAIN_KEYS = {
    "model_name_or_path": "model.source / model.hub_id / model.path",
    "output_dir": "output_dir (top level)",
    "deepspeed": "deepspeed (top level: none, z1, z2, z3, z3_offload, auto, ...)",
    "dataset_dir": "data.dir",
    "dataset": "data.dataset",
    "overwrite_output_dir": "nothing: sftjobs never overwrites a run's output_dir, so restarts resume",
    "report_to": "tracking (top level: none, tensorboard or wandb)",
    "logging_dir": "tracking: tensorboard (the logs go to the run directory's tensorboard/)",
}
# Passed-through LLaMA-Factory keys whose values sftjobs checks itself because a bad one wastes a GPU job.
_TRAIN_CHECKS: dict[str, tuple[type | tuple[type, ...], Callable[[Any], str | None]]] = {
    "per_device_train_batch_size": (int, _at_least(1)),
    "gradient_accumulation_steps": (int, _at_least(1)),
    "cutoff_len": (int, _at_least(1)),
    "max_samples": (int, _at_least(1)),
    "num_train_epochs": ((int, float), lambda v: None if v > 0 else "must be > 0"),
    "learning_rate": ((int, float), lambda v: None if v > 0 else "must be > 0"),
    "save_steps": (int, _at_least(1)),
    "logging_steps": (int, _at_least(1)),
    "preprocessing_num_workers": (int, _at_least(1)),
    "warmup_ratio": ((int, float), _fraction),
}


def llamafactory_keys() -> frozenset[str]:
    """Every key LLaMA-Factory 0.9.5's argument parser accepts (snapshot; a train-tier test checks it)."""
    path = Path(__file__).with_name("llamafactory_keys.txt")
    return frozenset(line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))


@dataclass
class Profile:
    """A resolved, validated profile: ``values`` is the nested dict with every default filled in."""

    name: str
    source: str  # the file it came from (the leaf of the extends chain)
    values: dict[str, Any]
    chain: list[str] = field(default_factory=list)  # files, leaf first
    overrides: list[str] = field(default_factory=list)

    def get(self, dotted: str) -> Any:
        node: Any = self.values
        for part in dotted.split("."):
            node = node[part]
        return node

    @property
    def train(self) -> dict[str, Any]:
        return self.values["train"]

    @property
    def spec(self) -> ProfileSpec:
        """The typed view of ``values`` (sftjobs.spec): ``profile.spec.resources.gpus_per_node``."""
        return spec_of(self.values)

    def config_hash(self) -> str:
        blob = json.dumps(self.values, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------- finding and reading


def profile_search_path(cwd: Path | None = None) -> list[Path]:
    """The user's ./configs first (their own stages), then the profiles sftjobs ships."""
    paths = [(cwd or Path.cwd()) / "configs"]
    shipped = shipped_dir("configs")
    if shipped.resolve() not in [p.resolve() for p in paths]:
        paths.append(shipped)
    return paths


def find_profile(ref: str, relative_to: Path | None = None) -> Path:
    """PROFILE is a path to a YAML file or a name found in configs/."""
    candidate = Path(ref)
    if relative_to is not None and not candidate.is_absolute():
        candidate = relative_to / candidate
    if ref.endswith((".yaml", ".yml")) or "/" in ref:
        if candidate.is_file():
            return candidate
        raise SftjobsError(f"profile file {candidate} does not exist. Give a path to a YAML file or a name from `sftjobs profiles`.")
    for directory in ([relative_to] if relative_to else []) + profile_search_path():
        for suffix in (".yaml", ".yml"):
            path = directory / f"{ref}{suffix}"
            if path.is_file():
                return path
    known = sorted(list_profile_names())
    hint = _did_you_mean(ref, known)
    raise SftjobsError(f"no profile named {ref!r}{hint}. Known profiles: {', '.join(known) or 'none'} (see `sftjobs profiles`).")


def list_profile_names() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for directory in reversed(profile_search_path()):
        if directory.is_dir():
            for path in sorted(directory.glob("*.y*ml")):
                found[path.stem] = path
    return found


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise SftjobsError(f"cannot read profile {path}: {exc.strerror}.") from None
    found = sniff_not_utf8(blob[:SNIFF_BYTES])
    if found is not None:
        raise SftjobsError(f"profile {not_utf8_advice(path, found, 'profile', 'give the path of the YAML profile itself')}.")
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = blob[: exc.start].count(b"\n") + 1
        raise SftjobsError(
            f"profile {path} is not UTF-8 text: byte 0x{blob[exc.start]:02x} on line {line} is not UTF-8 "
            f"({exc.reason}). If the file was saved as Latin-1 or Windows-1252, convert it, e.g. "
            f"`iconv -f LATIN1 -t UTF-8 {path} > {path.with_name(path.stem + '.utf8' + path.suffix)}`.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SftjobsError(f"profile {path} is not valid YAML{where}: {problem}. Fix the YAML syntax there.") from None
    if data is None:
        raise SftjobsError(f"profile {path} is empty. A profile needs at least output_dir, model and data (see configs/toy.yaml).")
    if not isinstance(data, dict):
        raise SftjobsError(f"profile {path} must be a YAML mapping of keys, not a {type(data).__name__}.")
    return data


def check_profile_name(path: Path) -> None:
    """The file name of the profile a run is made from must be safe as a run id, job name and directory name."""
    if not PROFILE_NAME.fullmatch(path.stem):
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).lstrip("-.")[:100] or "my_profile"
        raise SftjobsError(
            f"profile file {str(path)!r}: its name {path.stem!r} becomes the run id, the run directory, the Slurm "
            f"job name and a comment in the launch scripts, so it may hold only {PROFILE_NAME_RULE}. Rename the "
            f"file, e.g. to {safe + path.suffix!r}.")


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else (lists included) in ``top`` replaces ``base``."""
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _load_chain(path: Path, seen: list[Path]) -> tuple[dict[str, Any], list[str]]:
    resolved = path.resolve()
    if resolved in seen:
        cycle = " -> ".join(str(p) for p in seen + [resolved])
        raise SftjobsError(f"profiles extend each other in a loop: {cycle}. Remove one `extends:`.")
    data = read_yaml_mapping(path)
    parent_ref = data.get("extends")
    if parent_ref is None:
        return data, [str(path)]
    if not isinstance(parent_ref, str):
        raise SftjobsError(f"{path}: key 'extends' must be a profile name or path, not {parent_ref!r}.")
    try:
        parent_path = find_profile(parent_ref, relative_to=path.parent)
    except SftjobsError as exc:
        raise SftjobsError(f"{path}: its parent profile (extends: {parent_ref}) cannot be found: {exc}") from None
    parent, chain = _load_chain(parent_path, seen + [resolved])
    return deep_merge(parent, data), [str(path)] + chain


# ----------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, Any]:
    """``--set train.cutoff_len=2048``: the value is read as YAML, so numbers and booleans keep their type."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise SftjobsError(f"--set {text!r} must look like key=value, e.g. --set train.cutoff_len=2048.")
    if "\n" in raw or "\r" in raw:
        return key, raw  # YAML would fold the lines or drop a "#..." part: keep multi-line text verbatim
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text verbatim
    return key, value


def apply_override(values: dict[str, Any], key: str, value: Any) -> None:
    node = values
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SftjobsError(f"--set {key}: {part!r} is a value, not a section, so it has no key {parts[-1]!r}.")
        node = child
    node[parts[-1]] = value


# ----------------------------------------------------------------------------- validation


def _did_you_mean(word: str, options: list[str] | set[str] | frozenset[str]) -> str:
    close = difflib.get_close_matches(word, sorted(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _nearest_key_hint(key: str) -> str:
    """Did-you-mean for an unknown profile key, as the full key to write: a misspelt section (`resorces` ->
    'resources', `resorces.nodes` -> 'resources.nodes'), a key of a section written at the top (`cutoff_len` ->
    'train.cutoff_len', `partition` -> 'resources.partition'), or a misspelt key (`model.hubid` -> 'model.hub_id')."""
    full = set(SCHEMA) | SECTIONS | {f"train.{k}" for k in llamafactory_keys()}
    by_leaf: dict[str, list[str]] = {}
    for name in sorted(full):
        by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    section, _, leaf = key.rpartition(".")
    if section and section not in SECTIONS:  # `resorces.nodes`: fix the section, keep the leaf if it fits
        fixed = difflib.get_close_matches(section, sorted(SECTIONS), n=1, cutoff=0.6)
        if fixed and (f"{fixed[0]}.{leaf}" in full or fixed[0] == "train"):
            return f" (did you mean {fixed[0] + '.' + leaf!r}?)"
    if section in SECTIONS:
        options = [k for k in full if k.startswith(section + ".")]
        return _did_you_mean(key, options) or _did_you_mean(key, full - SECTIONS)
    if leaf in by_leaf:  # the right name in the wrong place
        return f" (did you mean {' or '.join(repr(k) for k in by_leaf[leaf])}?)"
    top = [k for k in full if "." not in k]
    if hint := _did_you_mean(leaf, top):
        return hint
    close = difflib.get_close_matches(leaf, sorted(by_leaf), n=1, cutoff=0.75)
    return f" (did you mean {' or '.join(repr(k) for k in by_leaf[close[0]])}?)" if close else _did_you_mean(key, full)


def _type_name(t: type | tuple[type, ...]) -> str:
    types = t if isinstance(t, tuple) else (t,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list",
             dict: "a mapping", type(None): "null"}
    return " or ".join(names.get(x, x.__name__) for x in types)


def _is_type(value: Any, t: type | tuple[type, ...]) -> bool:
    types = t if isinstance(t, tuple) else (t,)
    if isinstance(value, bool) and bool not in types:
        return False  # YAML true is not an integer here
    return isinstance(value, types)


def _flatten(values: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub, subvalue in value.items():
                flat[f"{key}.{sub}"] = subvalue
        else:
            flat[key] = value
    return flat


def validate(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Check keys, types and values; return the nested dict with defaults filled in."""
    flat = _flatten(raw)
    for key, value in flat.items():
        if key in SECTIONS:  # e.g. `model: foo` instead of a mapping
            raise SftjobsError(f"{where}: key {key!r} must be a mapping of keys ({key}.xxx), not {value!r}.")
        if key not in SCHEMA:
            hint = _nearest_key_hint(key)
            raise SftjobsError(f"{where}: unknown key {key!r}{hint}. Known keys are listed in configs/toy.yaml.")
        if (inner := _nul_in(value)) is not None:
            raise SftjobsError(f"{where}: key {key + inner!r} holds a NUL character ({value!r}); no path, name or "
                               "value can hold one. Remove it.")
    values: dict[str, Any] = {}
    for key, spec in SCHEMA.items():
        value = flat.get(key, copy.deepcopy(spec.default))
        if key in NONBLANK_KEYS and isinstance(value, str) and not value.strip():
            raise SftjobsError(f"{where}: key {key!r} is empty ({value!r}); an empty path would mean the current "
                               "directory. Give it a value (an unset shell variable in --set gives an empty one)"
                               + (", or null to leave it unset." if spec.type == OPT_STR else "."))
        if value is None and spec.default is None and type(None) not in (spec.type if isinstance(spec.type, tuple) else (spec.type,)):
            if key == "output_dir":
                raise SftjobsError(f"{where}: key 'output_dir' is missing. Set it to the checkpoint directory, e.g. output_dir: ./checkpoints/my_run.")
        elif not _is_type(value, spec.type):
            raise SftjobsError(f"{where}: key {key!r} must be {_type_name(spec.type)}, not {value!r}.")
        elif spec.check is not None and (problem := spec.check(value)):
            raise SftjobsError(f"{where}: key {key!r} {problem} (got {value!r}).")
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    _validate_train(values["train"], where)
    _validate_relations(values, where)
    return values


def _nul_in(value: Any) -> str | None:
    """"" when ``value`` is a string holding NUL, ".sub.key" or "[n]" when something inside it does, else None."""
    if isinstance(value, str):
        return "" if "\0" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and "\0" in k:
                return f".{k}"
            if (inner := _nul_in(v)) is not None:
                return f".{k}{inner}"
    if isinstance(value, list):
        for n, v in enumerate(value):
            if (inner := _nul_in(v)) is not None:
                return f"[{n}]{inner}"
    return None


def _validate_train(train: dict[str, Any], where: str) -> None:
    known = llamafactory_keys()
    for key, value in train.items():
        if key in MANAGED_TRAIN_KEYS:
            raise SftjobsError(f"{where}: train.{key} is set by sftjobs; use {MANAGED_TRAIN_KEYS[key]} instead.")
        if key not in known:
            raise SftjobsError(f"{where}: unknown LLaMA-Factory key train.{key}{_did_you_mean(key, known)}. "
                               "train: passes keys to LLaMA-Factory 0.9.5 unchanged, so it must be one of its arguments.")
        if isinstance(value, str) and _SCI_FLOAT.match(value):
            value = train[key] = float(value)  # YAML 1.1 reads 1e-5 as text; LLaMA-Factory would take it as a float
        if key in _TRAIN_CHECKS:
            expected, check = _TRAIN_CHECKS[key]
            if not _is_type(value, expected):
                raise SftjobsError(f"{where}: key 'train.{key}' must be {_type_name(expected)}, not {value!r}.")
            if problem := check(value):
                raise SftjobsError(f"{where}: key 'train.{key}' {problem} (got {value!r}).")


def _validate_relations(v: dict[str, Any], where: str) -> None:
    res, model, data = v["resources"], v["model"], v["data"]
    if res["gpus_per_node"] > res["max_gpus_per_node"]:
        raise SftjobsError(f"{where}: resources.gpus_per_node is {res['gpus_per_node']} but a node has "
                           f"{res['max_gpus_per_node']} GPUs (resources.max_gpus_per_node). Use more nodes or fewer GPUs.")
    if v["deepspeed"] != "none" and res["gpus_per_node"] == 0:
        raise SftjobsError(f"{where}: deepspeed: {v['deepspeed']} needs GPUs but resources.gpus_per_node is 0. "
                           "Set deepspeed: none for a CPU run, or ask for GPUs.")
    if problem := global_size_problem(v):
        raise SftjobsError(f"{where}: {problem}.")
    if res["nodes"] > 1 and res["executor"] in ("local", "debug"):
        raise SftjobsError(f"{where}: resources.nodes is {res['nodes']} but the {res['executor']} executor runs on this "
                           "machine only. Use executor slurm (or auto on a Slurm cluster), or nodes: 1.")
    if res["nodes"] > 1 and res["gpus_per_node"] == 0:
        raise SftjobsError(f"{where}: a multi-node run (resources.nodes {res['nodes']}) needs GPUs on each node.")
    if model["source"] == "hub" and not (model["hub_id"] and model["local_dir"]):
        raise SftjobsError(f"{where}: model.source hub needs model.hub_id and model.local_dir (where to download it).")
    if model["source"] == "path" and not model["path"]:
        raise SftjobsError(f"{where}: model.source path needs model.path (a local model directory).")
    if model["source"] == "synthetic" and not model["local_dir"]:
        raise SftjobsError(f"{where}: model.source synthetic needs model.local_dir (where sftjobs makes the tiny model).")
    if data["source"] == "hub" and not (data["hub_repo"] and data["hub_file"]):
        raise SftjobsError(f"{where}: data.source hub needs data.hub_repo and data.hub_file, e.g. "
                           "dongguanting/ARPO-SFT-54K and final_5w4_still.jsonl.")
    if data["source"] == "path" and not data["path"]:
        raise SftjobsError(f"{where}: data.source path needs data.path (a JSONL or JSON file).")
    if v["speed"]["per_sample_attention"] and not v["train"].get("neat_packing"):
        raise SftjobsError(f"{where}: speed.per_sample_attention needs train.neat_packing: true (it keeps packed "
                           "samples apart); set train.packing and train.neat_packing, or turn it off.")
    if v["speed"]["pack_rank_samples"]:
        if v["train"].get("packing") or v["train"].get("neat_packing"):
            raise SftjobsError(f"{where}: speed.pack_rank_samples packs each GPU's samples itself; it needs "
                               "train.packing and train.neat_packing false (or turn it off).")
        if v["train"].get("per_device_train_batch_size") != 1:
            raise SftjobsError(f"{where}: speed.pack_rank_samples needs train.per_device_train_batch_size: 1 (one "
                               "packed row per micro-step); set it, or turn pack_rank_samples off.")
    if v["speed"]["cudnn_attention_bucket"] and not (v["speed"]["per_sample_attention"]
                                                      or v["speed"]["pack_rank_samples"]):
        raise SftjobsError(f"{where}: speed.cudnn_attention_bucket sets the kernel of sftjobs' per-sample attention; "
                           "it needs speed.per_sample_attention or speed.pack_rank_samples (or set it to 0).")
    if v["speed"]["skip_idle_micro_steps"] and not v["speed"]["pack_rank_samples"]:
        raise SftjobsError(f"{where}: speed.skip_idle_micro_steps needs speed.pack_rank_samples: true (only packed "
                           "steps have micro-steps with nothing to compute); turn one on or this off.")
    if v["speed"]["split_long_samples"] and not v["speed"]["pack_rank_samples"]:
        raise SftjobsError(f"{where}: speed.split_long_samples needs speed.pack_rank_samples: true (the halves of a "
                           "split sample are packed rows); turn one on or this off.")
    if v["train"].get("bf16") and res["gpus_per_node"] == 0:
        raise SftjobsError(f"{where}: train.bf16 is true but resources.gpus_per_node is 0; a CPU run needs bf16: false.")


def load_profile(ref: str, overrides: list[str] | None = None) -> Profile:
    """Find, read, merge (extends), override (--set) and validate one profile."""
    path = find_profile(ref)
    check_profile_name(path)
    raw, chain = _load_chain(path, [])
    raw.pop("extends", None)
    overrides = list(overrides or [])
    for text in overrides:
        key, value = parse_override(text)
        if key == "extends":
            raise SftjobsError("--set extends=... is not supported; pass the parent profile as PROFILE instead.")
        apply_override(raw, key, value)
    shown = [o if o.isprintable() else repr(o) for o in overrides]  # a newline in a value keeps the message one line
    where = str(path) + (f" (with --set {' '.join(shown)})" if overrides else "")
    values = validate(raw, where)
    return Profile(name=path.stem, source=str(path), values=values, chain=chain, overrides=overrides)

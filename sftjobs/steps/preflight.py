"""The pre-flight step: everything that can be checked before a GPU-hour is spent.

One node, the training step's GPUs, minutes. Each check is a line in the step log and a field in
reports/preflight.json; every failed check is collected, and the step ends with one SftjobsError that
lists them all with what to change, so a user fixes everything in one round trip.

  gpus           visible GPUs == resources.gpus_per_node (torch.cuda.device_count, nvidia-smi when present)
  versions       torch / transformers / deepspeed / llamafactory / accelerate / flash_attn / python, each next to
                 the one recorded in manifest.json at submit time; the first four must be equal
  patches        which speed features run on these versions (sftjobs/trainer/patches.py): one line for each that
                 turns itself off (unverified version or a missing patch target), and what that costs
  known_bad      combinations that fail mid-run, refused with the fix: flash_attn fa2 with transformers 5.6.0;
                 a ZeRO offload stage whose cpu_adam op DeepSpeed cannot build here (its own op builder's report)
  paths          model folder (loadable config, tokenizer, weights), every file in dataset_info.json,
                 the DeepSpeed JSON, a writable parent of each output_dir
  training_yaml  every rendered LLaMA-Factory YAML through LLaMA-Factory's own HfArgumentParser
                 (allow_extra_keys=False), the DeepSpeed JSON through DeepSpeedConfig with its "auto"
                 values resolved as transformers does
  disk           free space at each output_dir against the checkpoints the run will write
  memory         DeepSpeed's model-state estimate for the chosen ZeRO stage against GPU memory; with
                 deepspeed: auto, the node's GPU memory against the resources.gpu_memory_gib the plan assumed
  data           the first SAMPLE_ROWS rows through LLaMA-Factory's own loader, converter, template and
                 tokenizer; the longest sample's token count against cutoff_len

torch, transformers, deepspeed and llamafactory are imported inside functions: importing this module
costs nothing on a login node.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import math
import os
import platform
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sftjobs.errors import SftjobsError
from sftjobs.planning.batch import optimizer_steps

SAMPLE_ROWS = 64
PACKAGES = ("torch", "transformers", "deepspeed", "llamafactory", "accelerate", "flash_attn")
# A mismatch in these between the submit machine and a node fails the step: the plan asks for the same
# environment everywhere, and these four decide what a checkpoint looks like and how the run behaves.
STRICT_PACKAGES = ("torch", "transformers", "deepspeed", "llamafactory")

# Disk: bytes one checkpoint of a full fine-tune takes, per parameter. With DeepSpeed (bf16): the
# 16-bit model saved by the Trainer (2) + DeepSpeed's 16-bit module states (2) + the fp32 master weights
# and Adam's two moments (4 + 4 + 4) = 16. Without DeepSpeed the Trainer saves fp32 weights (4) and
# Adam's moments (8) = 12, so 16 is an upper bound for both. save_only_model keeps just the weights.
CHECKPOINT_BYTES_PER_PARAM = 16
FINAL_MODEL_BYTES_PER_PARAM = 4  # the final export: 2 in bf16, 4 when saved in fp32 (upper bound)
MEMORY_WARN_FRACTION = 0.8  # model states above this share of GPU memory leave little for activations

DEEPSPEED_STAGES = {"none": (None, False), "z0": (0, False), "z1": (1, False), "z2": (2, False),
                    "z2_offload": (2, True), "z3": (3, False), "z3_offload": (3, True)}
# deepspeed: auto planned for resources.gpu_memory_gib; a node this much smaller fails the memory check
# (an "80 GiB" H100 reports ~79.2 GiB, which must pass).
GPU_MEMORY_TOLERANCE = 0.02


def _result(ok: bool, summary: str, warnings: list[str] | None = None, **details: Any) -> dict[str, Any]:
    """A check's outcome: {"ok", "summary", "warnings", ...details}; ``error`` says what to change."""
    return {"ok": ok, "summary": summary, "warnings": list(warnings or []), **details}


# ============================================================================ (a) GPUs


def count_gpus() -> dict[str, Any]:
    """What this process can see: torch's count (honours CUDA_VISIBLE_DEVICES) and nvidia-smi's list."""
    info: dict[str, Any] = {
        "torch": 0,
        "nvidia_smi": None,
        "names": [],
        "memory_bytes": [],
        "bf16_supported": None,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "torch_cuda": None,
    }
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["torch"] = torch.cuda.device_count()
            for i in range(info["torch"]):
                props = torch.cuda.get_device_properties(i)
                info["names"].append(props.name)
                info["memory_bytes"].append(int(props.total_memory))
            info["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
    except ImportError:
        info["torch_error"] = "torch is not installed"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=60)
            if out.returncode == 0:
                info["nvidia_smi"] = len([line for line in out.stdout.splitlines() if line.strip()])
            else:
                info["nvidia_smi_error"] = (out.stderr or out.stdout).strip().splitlines()[:1]
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["nvidia_smi_error"] = str(exc)
    return info


def check_gpus(requested: int, info: dict[str, Any], bf16: bool = False) -> dict[str, Any]:
    """Visible GPUs must equal the request: fewer means a broken allocation, more means LLaMA-Factory
    would train on all of them (a different global batch than the profile says)."""
    seen = info["torch"]
    smi = info.get("nvidia_smi")
    details = {"requested": requested, "visible": seen, "nvidia_smi": smi, "names": info.get("names", []),
               "cuda_visible_devices": info.get("cuda_visible_devices")}
    if requested == 0:
        warn = [f"{seen} GPU(s) are visible to a CPU run (resources.gpus_per_node 0); LLaMA-Factory may use them"] if seen else []
        return _result(True, f"CPU run (resources.gpus_per_node 0), {seen} GPU(s) visible", warn, **details)
    if seen == requested:
        problems = []
        if bf16 and info.get("bf16_supported") is False:
            problems.append(f"train.bf16 is true but these GPUs ({', '.join(sorted(set(info['names'])))}) do not "
                            "support bf16: set train.bf16: false and train.fp16: true in the profile")
        if problems:
            return _result(False, problems[0], error=problems[0], **details)
        names = ", ".join(sorted(set(info.get("names") or []))) or "unknown"
        return _result(True, f"{seen} GPU(s) visible as requested ({names})", **details)
    if seen == 0 and smi:
        error = (f"torch sees no GPU but nvidia-smi lists {smi}: the installed torch has no CUDA support or the "
                 f"driver is too old for it (torch CUDA {info.get('torch_cuda')}); install a CUDA build of torch "
                 "on the nodes (launcher.setup / launcher.python)")
    elif seen == 0:
        error = (f"no GPU is visible to this job (CUDA_VISIBLE_DEVICES={info.get('cuda_visible_devices')!r}, "
                 f"nvidia-smi: {'absent' if smi is None else smi}) but the profile asks for {requested}: the job got "
                 "no GPU; check the GPU request (resources.partition / resources.sbatch_extra, e.g. --gres=gpu:N) "
                 "or run on a GPU node")
    elif seen < requested:
        error = (f"{seen} GPU(s) visible (CUDA_VISIBLE_DEVICES={info.get('cuda_visible_devices')!r}, nvidia-smi: "
                 f"{smi if smi is not None else 'absent'}) but the profile asks for {requested}: check the job's GPU "
                 f"allocation (--gpus-per-node / resources.sbatch_extra) or set resources.gpus_per_node to {seen}")
    else:
        error = (f"{seen} GPUs visible but the profile asks for {requested} (resources.gpus_per_node): LLaMA-Factory "
                 f"would train on all {seen} and change the global batch; set resources.gpus_per_node to {seen} "
                 "or restrict CUDA_VISIBLE_DEVICES on the node")
    return _result(False, error, error=error, **details)


# ============================================================================ (e) versions


def library_versions() -> dict[str, str | None]:
    """Installed versions (metadata only: nothing is imported) plus python's."""
    from sftjobs.trainer.patches import installed_version  # the one version lookup (tests simulate through it)

    versions: dict[str, str | None] = {name: installed_version(name) for name in PACKAGES}
    versions["python"] = platform.python_version()
    return versions


def compare_versions(current: dict[str, Any], recorded: dict[str, Any] | None) -> list[str]:
    """One line per strict package whose version differs from the one recorded at submit time."""
    if not recorded:
        return []
    return [f"{name} {current.get(name) or 'not installed'} here, {recorded.get(name) or 'not installed'} at submit"
            for name in STRICT_PACKAGES if name in recorded and current.get(name) != recorded.get(name)]


def check_versions(current: dict[str, Any], recorded: dict[str, Any] | None, deepspeed: str) -> dict[str, Any]:
    problems = []
    for name in ("torch", "transformers", "llamafactory"):
        if not current.get(name):
            problems.append(f"{name} is not installed for the nodes' python; install sftjobs[train] there "
                            "(launcher.python / launcher.setup)")
    if deepspeed != "none" and not current.get("deepspeed"):
        problems.append(f"deepspeed: {deepspeed} needs the deepspeed package, which is not installed for the nodes' "
                        "python; install it (sftjobs[train]) or set deepspeed: none")
    mismatches = compare_versions(current, recorded)
    if mismatches:
        problems.append("the nodes run other library versions than the machine that submitted the run ("
                        + "; ".join(mismatches) + "): use the same environment on every machine "
                        "(launcher.python / launcher.setup), or submit again from this environment")
    python_note = []
    if recorded and recorded.get("python") and recorded.get("python") != current.get("python"):
        python_note.append(f"python {current.get('python')} here, {recorded.get('python')} at submit")
    # the node's environment next to the one recorded at submit: "transformers 5.5.4 (submit: 5.6.0)"
    summary = ", ".join(f"{k} {v}" + (f" (submit: {recorded.get(k) or 'not installed'})"
                                      if recorded and k in recorded and recorded.get(k) != v else "")
                        for k, v in current.items())
    if problems:
        return _result(False, "; ".join(problems), python_note, error="; ".join(problems), versions=current,
                       recorded=recorded or None)
    compared = "same as at submit" if recorded else "no versions recorded at submit to compare with"
    return _result(True, f"{summary} ({compared})", python_note, versions=current, recorded=recorded or None)


# ============================================================================ patches and known-bad combinations


def check_patches(speed: dict[str, Any] | None, deepspeed: str = "none") -> dict[str, Any]:
    """Which speed features the training run will have on these versions (sftjobs/trainer/patches.py decides the
    same way in every training process). A feature that is off is a warning, not a failure: the run goes on stock."""
    from sftjobs.trainer import patches

    checks = ["preflight.data"] + (["preflight.deepspeed"] if deepspeed != "none" else [])
    decisions = patches.decide(patches.speed_features(speed) + ["signal_save.loader_workers"] + checks)
    off = [d for d in decisions.values() if not d.on]
    warnings = [d.line() for d in decisions.values() if not d.on or d.notes]
    on = [name for name, d in decisions.items() if d.on and name.startswith(("speed.", "unpadded"))]
    summary = f"on: {', '.join(on) or 'none'}" + (f"; off: {', '.join(d.feature for d in off)}" if off else "")
    return _result(True, summary, warnings, features={name: d.as_dict() for name, d in decisions.items()})


def check_known_bad(versions: dict[str, Any], cfg: dict[str, Any], speed: dict[str, Any] | None,
                    deepspeed: str, probe: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Refuse the combinations known to fail mid-run (patches.KNOWN_BAD; DeepSpeed's op builder for offload)."""
    from sftjobs.trainer import patches

    run = {"versions": versions, "flash_attn": cfg.get("flash_attn", "auto"), "speed": speed or {}}
    problems = [f"{rule.why}: {rule.fix}" for rule in patches.known_bad(run)]
    ops, found = patches.deepspeed_op_problems(deepspeed, probe) if versions.get("deepspeed") else ([], {})
    problems += [f"deepspeed: {deepspeed} JIT-builds cpu_adam on the node and cannot here: {p}" for p in ops]
    details = {"rules": [rule.name for rule in patches.KNOWN_BAD], "flash_attn": run["flash_attn"],
               "deepspeed_ops": found}
    if problems:
        return _result(False, "; ".join(problems), error="; ".join(problems), **details)
    return _result(True, f"no known-bad combination (flash_attn {run['flash_attn']}, transformers "
                   f"{versions.get('transformers')}, flash_attn package {versions.get('flash_attn') or 'absent'}; "
                   f"deepspeed {deepspeed}: {found.get('skipped') or 'cpu_adam can be built'})", **details)


# ============================================================================ (c) paths


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` or its closest existing parent (an output_dir does not exist before the first run)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def read_dataset_info(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(dataset_dir) / "dataset_info.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SftjobsError(f"{path} is missing: render the run again (sftjobs render / submit)") from None
    except ValueError as exc:
        raise SftjobsError(f"{path} is not valid JSON ({exc}): render the run again") from None
    if not isinstance(info, dict):
        raise SftjobsError(f"{path} is not a JSON object: render the run again")
    return info


def dataset_file(dataset_dir: str | os.PathLike, entry: dict[str, Any]) -> Path:
    """Where LLaMA-Factory looks for a registered file: os.path.join(dataset_dir, file_name)."""
    return Path(os.path.join(str(dataset_dir), entry.get("file_name", "")))


def check_paths(paths: dict[str, Any], output_dirs: list[str]) -> dict[str, Any]:
    from sftjobs.io.model_files import check_model_dir

    problems: list[str] = []
    details: dict[str, Any] = {}
    try:
        details["model"] = check_model_dir(paths["model_dir"], hub=True)
    except SftjobsError as exc:
        problems.append(f"model: {exc} (the model step should have made it; check its log)")
    files: dict[str, Any] = {}
    try:
        info = read_dataset_info(paths["dataset_dir"])
        for name, entry in info.items():
            f = dataset_file(paths["dataset_dir"], entry if isinstance(entry, dict) else {})
            files[name] = {"file": str(f), "exists": f.is_file(), "bytes": f.stat().st_size if f.is_file() else None}
            if not f.is_file():
                problems.append(f"dataset {name}: {f} does not exist (run the data step; data.dir decides where it goes)")
            elif f.stat().st_size == 0:
                problems.append(f"dataset {name}: {f} is empty (run the data step again)")
    except SftjobsError as exc:
        problems.append(str(exc))
    details["datasets"] = files
    ds = paths.get("deepspeed_config")
    if ds:
        details["deepspeed_config"] = ds
        if not Path(ds).is_file():
            problems.append(f"DeepSpeed config {ds} is missing: render the run again")
    writable = {}
    for out in output_dirs:
        parent = nearest_existing(out)
        ok = os.access(parent, os.W_OK | os.X_OK)
        writable[out] = {"nearest_existing": str(parent), "writable": ok}
        if not ok:
            problems.append(f"output_dir {out}: {parent} is not writable by this user; change output_dir in the profile "
                            "or fix the permissions")
    details["output_dirs"] = writable
    if problems:
        return _result(False, "; ".join(problems), error="; ".join(problems), **details)
    n_files = len(files)
    return _result(True, f"model folder, {n_files} dataset file(s){', DeepSpeed JSON' if ds else ''} present; "
                   "output dirs writable", **details)


# ============================================================================ (g) training YAML


def _lf_parser():
    from llamafactory.hparams import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments
    from llamafactory.hparams.training_args import TrainingArguments
    from transformers import HfArgumentParser

    return HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, FinetuningArguments, GeneratingArguments))


def _cpu_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    """HF refuses bf16/fp16 without a GPU; a static check on any machine turns them off."""
    return {**cfg, "bf16": False, "fp16": False, "use_cpu": True}


def _unset_deepspeed_global() -> None:
    # TrainingArguments(deepspeed=...) registers a process-wide HfTrainerDeepSpeedConfig; after a ZeRO-3
    # config every later from_pretrained in this process would try deepspeed.zero.Init. Undo it.
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    except ImportError:  # pragma: no cover
        pass


@contextlib.contextmanager
def _leaving_no_trace():
    """Building TrainingArguments for a check leaves process-wide state behind: the DeepSpeed config above and, on
    transformers 4 (4.56.2), variables in os.environ (ACCELERATE_USE_DEEPSPEED=true whenever a DeepSpeed config is
    given, ACCELERATE_MIXED_PRECISION, ...). Every process started from this one inherits them: a single-process
    training then goes through DeepSpeed, which asks for mpi4py to find its ranks, and a torchrun one trains under a
    DeepSpeed plugin its config never asked for. Both are undone: the environment is left as it was found."""
    environ = dict(os.environ)
    try:
        yield
    finally:
        _unset_deepspeed_global()
        if dict(os.environ) != environ:
            os.environ.clear()
            os.environ.update(environ)


def parse_training_config(cfg: dict[str, Any], with_deepspeed: bool = True) -> tuple[Any, ...]:
    """(model_args, data_args, training_args, finetuning_args, generating_args) as LLaMA-Factory parses them
    (CPU overrides applied). Raises what the parser raises."""
    cfg = _cpu_overrides(cfg)
    if not with_deepspeed:
        cfg.pop("deepspeed", None)
    with _leaving_no_trace():
        return tuple(_lf_parser().parse_dict(cfg, allow_extra_keys=False))


def check_training_yaml(cfg: dict[str, Any]) -> None:
    """LLaMA-Factory 0.9.5's HfArgumentParser must take every key of ``cfg`` (allow_extra_keys=False).

    bf16/fp16 are turned off and use_cpu on for the check (HF refuses bf16 without a GPU), so this runs
    on any machine. Raises SftjobsError naming the unknown key(s) or the parser's complaint.
    """
    try:
        parse_training_config(cfg)
    except ValueError as exc:
        match = re.search(r"Some keys are not used by the HfArgumentParser: \[(.*?)\]", str(exc))
        if match:
            keys = [k.strip().strip("'\"") for k in match.group(1).split(",") if k.strip()]
            from sftjobs.profile import llamafactory_keys

            known = sorted(llamafactory_keys())
            named = []
            for key in keys:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                named.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise SftjobsError(f"LLaMA-Factory 0.9.5 does not accept the key(s) {', '.join(named)}: fix or remove "
                               f"train.{keys[0]} in the profile (the training YAML passes train: keys unchanged)") from None
        raise SftjobsError(f"LLaMA-Factory 0.9.5 rejects the training config: {exc}. Fix that value in the "
                           "profile's train: section") from None
    except (TypeError, OSError) as exc:
        raise SftjobsError(f"LLaMA-Factory 0.9.5 rejects the training config: {type(exc).__name__}: {exc}. Fix "
                           "that value in the profile's train: section") from None


def check_deepspeed_config(path: str | os.PathLike, cfg: dict[str, Any], hidden_size: int = 4096,
                           num_training_steps: int = 100) -> dict[str, Any]:
    """DeepSpeed's own DeepSpeedConfig must accept the JSON once its "auto" values are resolved the way
    transformers resolves them at run time (HfTrainerDeepSpeedConfig: trainer_config_process + _finalize).
    Returns the resolved config; raises SftjobsError naming the problem."""
    from transformers import TrainingArguments

    args_cfg = {k: cfg[k] for k in ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                                    "weight_decay", "max_grad_norm", "warmup_ratio") if k in cfg}
    try:
        with _leaving_no_trace():
            args = TrainingArguments(output_dir=tempfile.gettempdir(), deepspeed=str(path), use_cpu=True, bf16=False,
                                     report_to="none", **args_cfg)
            hf = args.hf_deepspeed_config
            # trainer_config_finalize reads the model's hidden_size for the ZeRO-3 bucket "auto"s.
            model = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden_size, hidden_sizes=None))
            hf.trainer_config_finalize(args, model, num_training_steps)
            resolved = copy.deepcopy(hf.config)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise SftjobsError(f"DeepSpeed config {path}: transformers cannot resolve it ({type(exc).__name__}: {exc}); "
                           "render the run again (deepspeed: in the profile picks the template)") from None
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(copy.deepcopy(resolved))
    except Exception as exc:  # pydantic ValidationError, AssertionError, ...: all mean "DeepSpeed refuses it"
        first = str(exc).strip().splitlines()
        raise SftjobsError(f"DeepSpeed rejects {path}: {type(exc).__name__}: {' '.join(first[:3])}; render the run "
                           "again, or pick another deepspeed: value in the profile") from None
    return resolved


def _train_step(ctx, target: str):
    """The plan's training step for ``target`` (its resources decide the world size)."""
    for step in ctx.plan.steps:
        if step.kind == "train" and (step.target or "full") == target:
            return step
    return ctx.step


def _training_targets(ctx) -> list[str]:
    targets = ["full"]
    if any(step.target == "dry_run" for step in ctx.plan.steps):
        targets.insert(0, "dry_run")
    return targets


TRACKING_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_tracking_packages(cfg: dict[str, Any]) -> None:
    """report_to (the profile's tracking) needs its package on the node, or the trainer fails after loading."""
    import importlib.util

    wanted = cfg.get("report_to") or []
    for name in [wanted] if isinstance(wanted, str) else wanted:
        package = TRACKING_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise SftjobsError(f"tracking: {name} needs the {package} package, which this node's python lacks: "
                               f"pip install '.[track]' (or {package}) into the nodes' environment, or set "
                               "tracking: none")


def check_training_configs(ctx, hidden_size: int | None) -> dict[str, Any]:
    problems, checked = [], {}
    for target in _training_targets(ctx):
        path = ctx.training_config_path(target)
        try:
            cfg = ctx.training_config(target)
            check_training_yaml(cfg)
            check_tracking_packages(cfg)
            checked[str(path)] = "accepted"
        except SftjobsError as exc:
            checked[str(path)] = str(exc)
            problems.append(f"{path.name}: {exc}")
        except OSError as exc:
            problems.append(f"{path}: cannot read it ({exc.strerror}); render the run again")
    ds = ctx.paths.get("deepspeed_config")
    stage = None
    if ds and Path(ds).is_file():
        try:
            resolved = check_deepspeed_config(ds, ctx.training_config("full"), hidden_size or 4096)
            stage = resolved.get("zero_optimization", {}).get("stage")
            checked[ds] = f"accepted by DeepSpeedConfig (ZeRO stage {stage})"
        except SftjobsError as exc:
            checked[ds] = str(exc)
            problems.append(str(exc))
    if problems:
        return _result(False, "; ".join(problems), error="; ".join(problems), checked=checked)
    return _result(True, f"{len(checked)} config(s) accepted by LLaMA-Factory's parser"
                   + (" and DeepSpeed" if stage is not None else ""), checked=checked)


# ============================================================================ (b) disk


def estimate_disk(n_params: int, total_steps: int, save_steps: int, save_total_limit: int | None = None,
                  save_only_model: bool = False) -> dict[str, Any]:
    """Bytes a run writes into its output_dir.

    saves        = ceil(total_steps / save_steps) checkpoints (the Trainer also saves at the last step)
    kept         = min(save_total_limit, saves) when save_total_limit is set, else saves
    checkpoint   = n_params x 16 bytes (CHECKPOINT_BYTES_PER_PARAM: weights + DeepSpeed module states +
                   fp32 master weights + Adam moments), or n_params x 4 with save_only_model
    final model  = n_params x 4 bytes (FINAL_MODEL_BYTES_PER_PARAM, fp32 upper bound)
    need         = kept x checkpoint + final model
    """
    saves = max(math.ceil(total_steps / max(save_steps, 1)), 1)
    kept = min(save_total_limit, saves) if save_total_limit and save_total_limit > 0 else saves
    per_ckpt = n_params * (FINAL_MODEL_BYTES_PER_PARAM if save_only_model else CHECKPOINT_BYTES_PER_PARAM)
    final = n_params * FINAL_MODEL_BYTES_PER_PARAM
    return {"n_params": n_params, "total_steps": total_steps, "save_steps": save_steps, "saves": saves,
            "kept": kept, "checkpoint_bytes": per_ckpt, "final_model_bytes": final,
            "need_bytes": kept * per_ckpt + final}


def _gib(n: float) -> str:
    """A byte count for people: GiB from 1 GiB up, else MiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_disk(ctx, n_params: int, rows: int, free: Callable[[Path], int] | None = None) -> dict[str, Any]:
    """Free space at each output_dir (nearest existing parent) against estimate_disk; output dirs on one
    filesystem add up."""
    free = free or (lambda p: shutil.disk_usage(p).free)
    estimates: dict[str, Any] = {}
    for target in _training_targets(ctx):
        res = _train_step(ctx, target).resources
        world = max(res.nodes, 1) * max(res.gpus_per_node, 1)
        cfg = ctx.training_config(target)
        samples = min(rows, int(cfg.get("max_samples") or rows)) if rows else int(cfg.get("max_samples") or 1)
        steps = optimizer_steps(samples, world, int(cfg.get("per_device_train_batch_size", 8)),
                                int(cfg.get("gradient_accumulation_steps", 1)), float(cfg.get("num_train_epochs", 3.0)),
                                int(cfg.get("max_steps", -1) or -1))
        est = estimate_disk(n_params, steps, int(cfg.get("save_steps", 500)), cfg.get("save_total_limit"),
                            bool(cfg.get("save_only_model", False)))
        est.update(output_dir=str(cfg["output_dir"]), samples=samples, world_size=world)
        estimates[target] = est
    by_fs: dict[Any, dict[str, Any]] = {}
    for target, est in estimates.items():
        where = nearest_existing(est["output_dir"])
        key = where.stat().st_dev
        entry = by_fs.setdefault(key, {"path": str(where), "need_bytes": 0, "targets": []})
        entry["need_bytes"] += est["need_bytes"]
        entry["targets"].append(target)
    problems, warnings, parts = [], [], []
    for entry in by_fs.values():
        entry["free_bytes"] = free(Path(entry["path"]))
        parts.append(f"{_gib(entry['free_bytes'])} free at {entry['path']}, need ~{_gib(entry['need_bytes'])} "
                     f"({' + '.join(entry['targets'])})")
        if entry["free_bytes"] < entry["need_bytes"]:
            full = estimates.get("full", {})
            problems.append(
                f"{entry['path']} has {_gib(entry['free_bytes'])} free but the run needs ~{_gib(entry['need_bytes'])} "
                f"({full.get('kept', '?')} checkpoint(s) x {_gib(full.get('checkpoint_bytes', 0))} + final model, "
                f"{n_params / 1e9:.2f}B params x {CHECKPOINT_BYTES_PER_PARAM} bytes per checkpoint): set "
                "train.save_total_limit (e.g. 2), raise train.save_steps, set train.save_only_model: true, or "
                "point output_dir at a bigger filesystem")
        elif entry["free_bytes"] < 1.2 * entry["need_bytes"]:
            warnings.append(f"{entry['path']}: less than 20% headroom over the checkpoint estimate")
    tokenized = ctx.paths.get("tokenized_path")
    if tokenized and Path(tokenized).exists():
        warnings.append(f"{tokenized} already holds tokenized data: LLaMA-Factory reuses it and ignores the data "
                        "files; delete it if the data or cutoff_len changed since")
    if problems:
        return _result(False, "; ".join(problems), warnings, error="; ".join(problems), estimates=estimates,
                       filesystems=list(by_fs.values()))
    return _result(True, "; ".join(parts), warnings, estimates=estimates, filesystems=list(by_fs.values()))


# ============================================================================ (f) DeepSpeed memory


def safetensors_stats(model_dir: str | os.PathLike) -> tuple[int, int]:
    """(total parameters, largest tensor's parameters) from the safetensors headers alone."""
    total = largest = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as handle:
            (n,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = math.prod(int(d) for d in info["shape"])
            total += numel
            largest = max(largest, numel)
    return total, largest


def estimate_model_states(deepspeed: str, n_params: int, largest: int, gpus_per_node: int,
                          nodes: int = 1) -> dict[str, Any]:
    """DeepSpeed's own estimate of model-state memory (params, grads, optimizer) for the chosen stage.

    The *_all_cold functions only print a table; they call estimate_zero{2,3}_model_states_mem_needs for
    each option, which this calls for the one option the profile picked. ZeRO-3 assumes zero.Init (what
    transformers uses under ZeRO-3). none / z0 shard nothing: the ZeRO-2 formula on one GPU. ZeRO-1 has no
    estimator of its own: the ZeRO-2 formula plus the bf16 gradients it does not shard.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    stage, offload = DEEPSPEED_STAGES[deepspeed]
    if stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params=n_params, largest_layer_params=largest, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
            cpu_offload=offload, cpu_offload_params=offload, zero_init=True)
        fn = "estimate_zero3_model_states_mem_needs"
    elif stage in (1, 2):
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total_params=n_params, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=offload)
        fn = "estimate_zero2_model_states_mem_needs"
        if stage == 1:
            gpu += 2 * n_params * (1 - 1 / max(gpus_per_node * nodes, 1))
            fn += " + unsharded bf16 gradients (ZeRO-1)"
    else:
        cpu, gpu = estimate_zero2_model_states_mem_needs(total_params=n_params, num_gpus_per_node=1, num_nodes=1,
                                                         cpu_offload=False)
        fn = "estimate_zero2_model_states_mem_needs (1 GPU: nothing sharded)"
    return {"deepspeed": deepspeed, "stage": stage, "offload": offload, "n_params": n_params,
            "largest_layer_params": largest, "gpu_bytes": int(gpu), "cpu_bytes": int(cpu), "function": fn}


def host_memory_bytes() -> int:
    """This job's memory: the cgroup v2 limit when one is set, else the machine's RAM."""
    import psutil

    total = int(psutil.virtual_memory().total)
    try:
        rel = Path("/proc/self/cgroup").read_text().strip().splitlines()[0].split(":", 2)[2]
        limit = Path("/sys/fs/cgroup", rel.lstrip("/"), "memory.max").read_text().strip()
        if limit.isdigit():
            return min(total, int(limit))
    except (OSError, IndexError):
        pass
    return total


def gpu_memory_shortfall(assumed_gib: float, gpu_memory: list[int]) -> str | None:
    """What to change when the smallest GPU has less memory than deepspeed: auto planned for, else None."""
    if not gpu_memory:
        return None
    actual = min(gpu_memory) / 2**30
    if actual >= assumed_gib * (1 - GPU_MEMORY_TOLERANCE):
        return None
    fix = math.floor(actual * 10) / 10
    return (f"deepspeed: auto chose the ZeRO stage and recompute for {assumed_gib:g} GiB GPUs "
            f"(resources.gpu_memory_gib) but this node's GPUs have {actual:.1f} GiB, so the run would likely run out "
            f"of memory: set resources.gpu_memory_gib: {fix:g} and submit again")


def check_memory(deepspeed: str, n_params: int, largest: int, gpus_per_node: int, nodes: int,
                 gpu_memory: list[int], host_bytes: int | None = None, assumed_gib: float | None = None) -> dict[str, Any]:
    """``assumed_gib``: the GPU memory a deepspeed: auto plan assumed (checked against ``gpu_memory``)."""
    if gpus_per_node == 0:
        return _result(True, "skipped: CPU run (resources.gpus_per_node 0)", skipped=True)
    if assumed_gib is not None and (short := gpu_memory_shortfall(assumed_gib, gpu_memory)):
        return _result(False, short, error=short, assumed_gib=assumed_gib, gpu_memory_bytes=list(gpu_memory))
    if not n_params:
        return _result(True, "skipped: no parameter count (no usable safetensors weights, see paths)", skipped=True)
    est = estimate_model_states(deepspeed, n_params, largest, gpus_per_node, nodes)
    if not gpu_memory:
        return _result(True, f"skipped: no GPU visible to compare with (see gpus); {deepspeed} model states "
                       f"~{_gib(est['gpu_bytes'])} per GPU", skipped=True, estimate=est)
    smallest = min(gpu_memory)
    est["gpu_total_bytes"] = smallest
    warnings = []
    summary = (f"{deepspeed}: model states ~{_gib(est['gpu_bytes'])} per GPU of {_gib(smallest)}, "
               f"~{_gib(est['cpu_bytes'])} CPU (DeepSpeed {est['function']}); activations come on top")
    if est["gpu_bytes"] > smallest:
        error = (f"{summary}: the model states alone do not fit. Use deepspeed: z3 or z3_offload, more GPUs "
                 "(resources.gpus_per_node / resources.nodes), or a smaller model")
        return _result(False, error, error=error, estimate=est)
    if est["gpu_bytes"] > MEMORY_WARN_FRACTION * smallest:
        warnings.append(f"model states take {est['gpu_bytes'] / smallest:.0%} of GPU memory; long samples may OOM "
                        "(lower train.cutoff_len, per_device_train_batch_size 1, or a higher ZeRO stage/offload)")
    host = host_bytes if host_bytes is not None else host_memory_bytes()
    est["host_bytes"] = host
    if est["cpu_bytes"] > host:
        warnings.append(f"DeepSpeed estimates ~{_gib(est['cpu_bytes'])} of CPU memory, more than this job's "
                        f"{_gib(host)}: raise resources.mem (the estimate includes a 1.5x buffer)")
    return _result(True, summary, warnings, estimate=est)


# ============================================================================ (d) data through LLaMA-Factory


def _first_records(path: Path, n: int) -> list[Any]:
    from sftjobs.io.data_files import iter_records

    rows = []
    for record in iter_records(path):
        if record.error is None:
            rows.append(record.value)
        if len(rows) >= n:
            break
    return rows


def check_data(cfg: dict[str, Any], sample_rows: int = SAMPLE_ROWS) -> dict[str, Any]:
    """The first ``sample_rows`` rows of the trained data set through LLaMA-Factory 0.9.5's own code:
    load_tokenizer -> get_template_and_fix_tokenizer -> get_dataset_list (the rendered dataset_info.json)
    -> loader._load_single_dataset (datasets' json loader + align_dataset) -> the SFT DatasetProcessor.

    The sample is copied to a temp file so the full file (54K rows) is not converted to Arrow here, and
    the datasets cache goes to a temp dir. Token counts are measured with cutoff_len lifted, so they are
    the untruncated lengths the training run would cut at cutoff_len.
    """
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.data.loader import _get_dataset_processor, _load_single_dataset
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.extras.constants import FILEEXT2TYPE
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, _, _ = parse_training_config(cfg, with_deepspeed=False)
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    attrs = get_dataset_list(data_args.dataset, data_args.dataset_dir)
    if len(attrs) != 1:
        raise SftjobsError(f"expected one training data set, got {data_args.dataset}: set data.dataset in the profile")
    attr = attrs[0]
    if attr.load_from != "file":
        raise SftjobsError(f"data set {attr} is not a local file (load_from={attr.load_from}); render the run again")
    source = Path(os.path.join(data_args.dataset_dir, attr.dataset_name))
    ext = source.suffix.lstrip(".")
    if ext not in FILEEXT2TYPE:
        raise SftjobsError(f"{source}: LLaMA-Factory loads only {', '.join(sorted(FILEEXT2TYPE))} files; the data "
                           "step writes .jsonl, so run it again")
    rows = _first_records(source, sample_rows)
    if not rows:
        raise SftjobsError(f"{source} has no readable rows; run the data step again")
    # LLaMA-Factory's converter fails on a missing column with a bare KeyError; name the shapes instead.
    required = [attr.messages] if attr.formatting == "sharegpt" else [attr.prompt, attr.response]
    first = rows[0] if isinstance(rows[0], dict) else {}
    missing = [c for c in required if c and c not in first]
    if missing:
        raise SftjobsError(
            f"{source.name}: rows have the keys {sorted(first)} but dataset_info.json registers it as "
            f"{attr.formatting} and needs {missing}: the file has another shape; set data.shape in the profile "
            "(sharegpt, alpaca, or auto to detect it) and run the data step again")
    cutoff = int(data_args.cutoff_len)
    with tempfile.TemporaryDirectory(prefix="sftjobs-preflight-") as tmp:
        sample = Path(tmp) / f"sample{source.suffix}"
        sample.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        attr = copy.copy(attr)
        attr.dataset_name = str(sample)  # absolute: os.path.join(dataset_dir, it) is it
        model_args.cache_dir = str(Path(tmp) / "cache")
        data_args.preprocessing_num_workers = None
        data_args.max_samples = None
        data_args.streaming = False
        aligned = _load_single_dataset(attr, model_args, data_args, training_args)
        batch = aligned[:]
    uncut = copy.copy(data_args)
    uncut.cutoff_len = 10**9
    processor = _get_dataset_processor(uncut, "sft", template, tokenizer, None)
    out = processor.preprocess_dataset(batch)
    lengths = [len(ids) for ids in out["input_ids"]]
    kept = len(lengths)
    warnings = []
    result: dict[str, Any] = {"dataset": data_args.dataset[0], "file": str(source), "formatting": attr.formatting,
                              "template": data_args.template, "sampled_rows": len(rows), "kept_rows": kept,
                              "dropped_rows": len(rows) - kept, "cutoff_len": cutoff}
    if not kept:
        error = (f"LLaMA-Factory dropped all {len(rows)} sampled rows of {source.name} as invalid ({attr.formatting} "
                 f"with columns {attr.messages or attr.prompt!r}): the file's shape does not match dataset_info.json; "
                 "set data.shape in the profile (sharegpt, alpaca or auto) and run the data step again")
        return _result(False, error, error=error, **result)
    longest = max(lengths)
    over = sum(1 for n in lengths if n > cutoff)
    labels = out["labels"][0]
    result.update(max_tokens=longest, mean_tokens=round(sum(lengths) / kept, 1), over_cutoff=over,
                  example={"tokens": lengths[0], "trained_tokens": sum(1 for t in labels if t >= 0),
                           "text_head": tokenizer.decode(out["input_ids"][0][:96], skip_special_tokens=False)})
    if kept < len(rows):
        warnings.append(f"LLaMA-Factory dropped {len(rows) - kept} of {len(rows)} sampled rows as invalid (odd turn "
                        "order); the training run drops them too")
    if over:
        warnings.append(f"{over} of {kept} sampled rows exceed cutoff_len {cutoff} (longest {longest} tokens) and will "
                        "be truncated; raise train.cutoff_len if the answers matter (costs GPU memory)")
    summary = (f"{kept} of {len(rows)} sampled rows of {data_args.dataset[0]} load and tokenize with template "
               f"{data_args.template}; longest {longest} tokens (cutoff_len {cutoff}, {over} over)")
    return _result(True, summary, warnings, **result)


# ============================================================================ the step


def _skipped(why: str) -> dict[str, Any]:
    return _result(True, f"skipped: {why}", skipped=True)


def run(ctx) -> dict[str, Any]:
    values = ctx.profile
    node = ctx.step.resources  # this node's GPUs
    train_res = _train_step(ctx, "full").resources  # the training job's shape (nodes x GPUs)
    deepspeed = values.get("deepspeed", "none")
    memory_plan = ctx.memory_plan or {}
    if deepspeed == "auto":  # the stage the memory plan chose at render time (plan.json)
        deepspeed = memory_plan.get("stage", "none")
    assumed_gib = memory_plan["inputs"]["gpu_memory_gib"] if memory_plan.get("mode") == "auto" else None
    full_cfg = ctx.training_config("full")
    report: dict[str, Any] = {"step": ctx.step.name, "profile": ctx.plan.profile, "config_hash": ctx.config_hash,
                              "sample_rows": SAMPLE_ROWS, "checks": {}}
    failures: list[str] = []
    warnings: list[str] = []

    def record(name: str, fn: Callable[[], dict[str, Any]], advice: str | None = None) -> dict[str, Any]:
        """Run one check; with ``advice``, a library's exception is the check's finding (plus advice)."""
        try:
            result = fn()
        except SftjobsError as exc:
            result = _result(False, str(exc), error=str(exc))
        except Exception as exc:  # noqa: BLE001
            if advice is None:
                raise
            lines = str(exc).strip().splitlines() or [""]
            msg = f"{type(exc).__name__}: {' '.join(lines[:3])[:1500]}; {advice}"
            result = _result(False, msg, error=msg)
        report["checks"][name] = result
        tag = "skip" if result.get("skipped") else "ok" if result["ok"] else "FAIL"
        ctx.log(f"[{tag}] {name}: {result['summary']}")
        for w in result.get("warnings", []):
            ctx.log(f"[warn] {name}: {w}")
            warnings.append(f"{name}: {w}")
        if not result["ok"]:
            failures.append(f"{name}: {result.get('error') or result['summary']}")
        return result

    versions = library_versions()
    report["versions"] = versions
    record("versions", lambda: check_versions(versions, (ctx.manifest or {}).get("versions"), deepspeed))
    patch_check = record("patches", lambda: check_patches(values.get("speed"), deepspeed))
    record("known_bad", lambda: check_known_bad(versions, full_cfg, values.get("speed"), deepspeed))
    gpu_info = count_gpus()
    record("gpus", lambda: check_gpus(node.gpus_per_node, gpu_info, bool(full_cfg.get("bf16"))))
    output_dirs = [str(ctx.training_config(t)["output_dir"]) for t in _training_targets(ctx)]
    paths = record("paths", lambda: check_paths(ctx.paths, output_dirs))
    model = paths.get("model") or {}
    n_params = largest = 0
    if model.get("weight_format") == "safetensors":
        n_params, largest = safetensors_stats(model["path"])
    elif model.get("total_bytes"):
        n_params = model["total_bytes"] // 2  # .bin weights: assume 16-bit
    hidden = None
    try:
        hidden = json.loads((Path(ctx.paths["model_dir"]) / "config.json").read_text()).get("hidden_size")
    except (OSError, ValueError, AttributeError):
        pass
    record("training_yaml", lambda: check_training_configs(ctx, hidden),
           advice="fix the value in the profile's train: section")

    def disk() -> dict[str, Any]:
        if not n_params:
            return _skipped("no usable model folder to size checkpoints from (see paths)")
        info = read_dataset_info(ctx.paths["dataset_dir"])
        name = values["data"]["dataset"]
        rows = ctx.dataset_rows(name, dataset_file(ctx.paths["dataset_dir"], info.get(name, {})))
        return check_disk(ctx, n_params, rows)

    record("disk", disk)
    record("memory", lambda: check_memory(deepspeed, n_params, largest, train_res.gpus_per_node, train_res.nodes,
                                          gpu_info.get("memory_bytes") or [], assumed_gib=assumed_gib),
           advice="check that deepspeed is installed on the nodes")
    data_patch = patch_check.get("features", {}).get("preflight.data", {"on": True})
    if not data_patch["on"]:
        record("data", lambda: _skipped(data_patch["line"]))
    elif paths["ok"]:
        record("data", lambda: check_data(full_cfg),
               advice="LLaMA-Factory could not load or tokenize the data: check data.shape against the file and "
                      "the columns in dataset/dataset_info.json, and model.path / train.trust_remote_code for "
                      "the tokenizer")
    else:
        record("data", lambda: _skipped("the model or data files are missing (see paths)"))

    report["ok"] = not failures
    report["failures"] = failures
    report["warnings"] = warnings
    ctx.write_report(report)
    if failures:
        lines = "\n".join(f"  - {f}" for f in failures)
        raise SftjobsError(f"pre-flight found {len(failures)} problem(s) before any GPU time was spent "
                           f"(details in {ctx.report_path()}):\n{lines}")
    ctx.log(f"pre-flight passed ({len(report['checks'])} checks, {len(warnings)} warning(s)); report {ctx.report_path()}")
    return report

"""Plan -> the files of a run directory. Pure text first (``render_files``), then one atomic write each.

``sftjobs render`` and ``sftjobs submit`` both go through ``render_files``, so what a preview shows is what
the nodes run.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import jinja2
import yaml

from sftjobs.errors import SftjobsError
from sftjobs.fsutil import atomic_write_text
from sftjobs.planning.dag import Plan
from sftjobs.planning.memory import apply_plan, plan_memory
from sftjobs.profile import Profile
from sftjobs.resources import shipped_dir

SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system"}
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}
DATASET_FILES = {"arpo_sft_54k": "arpo_sft_54k.jsonl", "arpo_sft_toy": "arpo_sft_toy.jsonl"}
DEEPSPEED_STAGES = {"z0": (0, False), "z1": (1, False), "z2": (2, False), "z2_offload": (2, True), "z3": (3, False),
                    "z3_offload": (3, True)}
EXECUTABLE = 0o755
REGULAR = 0o644


class _OneLineDumper(yaml.SafeDumper):
    """safe_dump, except that a string holding a line break or another unprintable character is written
    double-quoted with escapes: PyYAML would otherwise write it single-quoted over several lines (a newline as a
    blank line, NEL and U+2028 raw), which a one-line ``key: value`` template cannot hold."""


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    plain = data.isprintable() and not any(c in data for c in "\x85\u2028\u2029\ufeff")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=None if plain else '"')


_OneLineDumper.add_representer(str, _represent_str)


def _yaml_scalar(value: Any) -> str:
    """One YAML value on one line, quoted when YAML would misread it (e.g. "yes", "1e-5", ": ", a newline)."""
    text = yaml.dump({"k": value}, Dumper=_OneLineDumper, default_flow_style=True, width=1 << 30,
                     allow_unicode=True).strip()
    text = text[len("{k: "):-1]
    if "\n" in text or "\r" in text:  # pragma: no cover - the representer above prevents it
        raise SftjobsError(f"cannot write {value!r} as one YAML line; this is a bug in sftjobs' renderer")
    return text


def _comment(value: Any) -> str:
    """Text inside a ``#`` comment of a rendered file: one printable line, or a refusal (never a new line of
    shell or YAML). Profile names are checked when loaded (profile.PROFILE_NAME); this guards every other caller."""
    text = str(value)
    if not text.isprintable() or any(c in text for c in "\x85\u2028\u2029"):
        raise SftjobsError(f"{text!r} cannot go into a comment of a rendered file: it holds a line break or another "
                           "control character")
    return text


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(shipped_dir("templates"))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["sh"] = lambda v: shlex.quote(str(v))
    env.filters["yaml"] = _yaml_scalar
    env.filters["comment"] = _comment
    return env


def render_template(name: str, **context: Any) -> str:
    return _environment().get_template(name).render(**context)


def absolute(path: str, base: Path) -> str:
    """Profile paths are relative to where sftjobs is run; rendered files carry absolute ones."""
    return os.path.normpath(os.path.join(str(base), os.path.expanduser(path)))


class RunPaths:
    """The absolute paths a run's files point at."""

    def __init__(self, profile: Profile, run_dir: Path, base: Path, run_id: str):
        v = profile.values
        self.run_dir = str(run_dir)
        model = v["model"]
        self.model_dir = absolute(model["path"] if model["source"] == "path" else model["local_dir"], base)
        self.data_dir = absolute(v["data"]["dir"], base)
        # "{run_id}" in output_dir gives each run its own checkpoints (the demo); without it a new run into the
        # same output_dir resumes from what is there, as LLaMA-Factory does.
        self.output_dir = absolute(v["output_dir"].replace("{run_id}", run_id), base)
        self.dry_run_output_dir = self.output_dir.rstrip("/") + "-dry-run"
        self.dataset_dir = os.path.join(self.run_dir, "dataset")
        self.deepspeed_config = os.path.join(self.run_dir, "deepspeed.json") if v["deepspeed"] != "none" else None
        self.datasets_cache = os.path.join(self.data_dir, ".hf_datasets_cache")
        self.tokenized_path = os.path.join(self.run_dir, "tokenized")
        self.data_path = absolute(v["data"]["path"], base) if v["data"]["path"] else None

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def world_size(profile: Profile) -> int:
    res = profile.values["resources"]
    return res["nodes"] * max(res["gpus_per_node"], 1)


def dry_run_steps(profile: Profile) -> int:
    """Optimizer steps that show the dry run dry_run.max_samples samples (never more than the full run has)."""
    train = profile.train
    per_step = world_size(profile) * train.get("per_device_train_batch_size", 1) * train.get("gradient_accumulation_steps", 1)
    samples = min(profile.values["dry_run"]["max_samples"], train.get("max_samples") or 10**12)
    return max(1, -(-samples // per_step))


def training_config(profile: Profile, paths: RunPaths, target: str) -> dict[str, Any]:
    """The LLaMA-Factory keys of the full run or the dry run, in render order.

    Both tokenize into the run's tokenized_path: the dry run tokenizes the full data set once (so a bad
    row or a slow tokenizer shows up before the long run) and trains dry_run.max_samples samples by
    max_steps; the full run and any restart then load the saved tokens instead of tokenizing again.
    """
    train = dict(profile.train)
    train.setdefault("tokenized_path", paths.tokenized_path)
    output_dir = paths.output_dir
    if target == "dry_run":
        steps = dry_run_steps(profile)
        train["max_steps"] = steps
        train["save_steps"] = steps  # one checkpoint, so the dry run proves saving and loading work
        train["logging_steps"] = min(train.get("logging_steps", 10), max(1, steps // 10))
        output_dir = paths.dry_run_output_dir
    return {
        "model_dir": paths.model_dir,
        "train": train,
        "dataset_dir": paths.dataset_dir,
        "dataset": profile.values["data"]["dataset"],
        "output_dir": output_dir,
        "deepspeed_config": paths.deepspeed_config,
    }


def _check_training_yaml(name: str, text: str, config: dict[str, Any]) -> None:
    """The rendered YAML must read back as exactly the keys and values meant, whatever the profile's text held
    (a newline, "#", ": ", Jinja or YAML syntax): nothing from a value may become a key of its own."""
    expected = {"model_name_or_path": config["model_dir"], **config["train"], "dataset_dir": config["dataset_dir"],
                "dataset": config["dataset"], "output_dir": config["output_dir"], "overwrite_output_dir": False}
    if config["deepspeed_config"]:
        expected["deepspeed"] = config["deepspeed_config"]
    if yaml.safe_load(text) != expected:
        raise SftjobsError(f"rendering {name}: the YAML does not read back as the profile's values; this is a bug in "
                           "templates/llamafactory.yaml.j2 or sftjobs' renderer, please report it with the profile")


def dataset_info(shape: str, data_dir: str) -> str:
    """dataset_info.json for LLaMA-Factory; shape "auto" registers sharegpt until the data step detects otherwise."""
    shape = "alpaca" if shape == "alpaca" else "sharegpt"
    entries = [{"name": name, "file_name": os.path.join(data_dir, file)} for name, file in DATASET_FILES.items()]
    columns = ALPACA_COLUMNS if shape == "alpaca" else SHAREGPT_COLUMNS
    text = render_template("dataset_info.json.j2", entries=entries, shape=shape, columns=columns)
    json.loads(text)  # a template bug must not reach LLaMA-Factory
    return text


def render_files(profile: Profile, plan: Plan, run_dir: Path, run_id: str, base: Path | None = None) -> dict[str, str]:
    """Every file of the run directory as text, keyed by path relative to the run directory.

    With deepspeed: auto or batch.global_size the memory plan decides the stage, gradient accumulation and
    recompute of the rendered files (``run``); profile.yaml keeps the profile as written.
    """
    base = base or Path.cwd()
    paths = RunPaths(profile, run_dir, base, run_id)
    memory = plan_memory(profile, paths.model_dir)
    run = apply_plan(profile, memory)
    v = run.values
    files: dict[str, str] = {}
    for target, name in (("full", "llamafactory/train.yaml"), ("dry_run", "llamafactory/dry_run.yaml")):
        config = training_config(run, paths, target)
        text = render_template("llamafactory.yaml.j2", profile_name=profile.name, target=target, **config)
        _check_training_yaml(name, text, config)
        files[name] = text
    if v["deepspeed"] != "none":
        stage, offload = DEEPSPEED_STAGES[v["deepspeed"]]
        text = render_template("deepspeed.json.j2", stage=stage, offload=offload)
        json.loads(text)
        files["deepspeed.json"] = text
    files["dataset/dataset_info.json"] = dataset_info(v["data"]["shape"], paths.data_dir)
    res = v["resources"]
    force_torchrun = v["deepspeed"] != "none" or res["gpus_per_node"] > 1 or res["nodes"] > 1
    python = v["launcher"]["python"] or sys.executable
    for step in plan.steps:
        files[step.script] = render_template(
            "step.sh.j2", step=step, run_id=run_id, run_dir=paths.run_dir, setup=v["launcher"]["setup"],
            python=python, datasets_cache=paths.datasets_cache, force_torchrun=force_torchrun,
            master_port_base=v["launcher"]["master_port_base"])
    files["profile.yaml"] = yaml.safe_dump(
        {"name": profile.name, "source": profile.source, "chain": profile.chain, "overrides": profile.overrides,
         "config_hash": profile.config_hash(), "values": profile.values}, sort_keys=False)
    record = {"run_id": run_id, "config_hash": profile.config_hash(), "paths": paths.to_dict(), **plan.to_dict()}
    if memory is not None:
        record["memory_plan"] = memory
    files["plan.json"] = json.dumps(record, indent=2) + "\n"
    return files


def memory_plan_of(files: dict[str, str]) -> dict[str, Any] | None:
    """The memory plan a rendered run carries in plan.json, if any."""
    return json.loads(files["plan.json"]).get("memory_plan")


def write_run_dir(files: dict[str, str], run_dir: Path) -> list[Path]:
    """Write every file atomically; scripts executable, nothing world-writable."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(run_dir, 0o755)
    except OSError as exc:
        raise SftjobsError(f"cannot create the run directory {run_dir}: {exc.strerror}. Choose another --out or jobs dir.") from None
    written = []
    for rel, text in sorted(files.items()):
        mode = EXECUTABLE if rel.endswith(".sh") else REGULAR
        try:
            written.append(atomic_write_text(run_dir / rel, text, mode=mode))
        except OSError as exc:
            raise SftjobsError(f"cannot write {run_dir / rel}: {exc.strerror}.") from None
    return written

"""The validate step: did the training run (full or dry run) do what the plan says?

For ctx.step.target ("full" or "dry_run"), from the run's output_dir and the monitor's samples:

  completed      trainer_log.jsonl's last line has current_steps == total_steps (trainer_state.json agrees)
  loss           every logged loss finite; mean of the last window below mean of the first window
                 (window = max(1, n // 4) logged points)
  memory         GPU memory stable: per GPU, peak of the last half of the active samples within 10% of
                 the peak of the first half. Judged on the memory allocated between optimizer steps that every
                 training process logs (monitor/allocator/<train step>-*.jsonl); without those, on nvidia-smi's
                 memory.used (monitor/<train step>*.jsonl); skipped without GPU samples
  checkpoints    checkpoint-* folders or the final model in output_dir; the final model (else the newest
                 checkpoint) loads with AutoModelForCausalLM + AutoTokenizer
  generation     greedy, max_new_tokens 32, on a few prompts of the toy file, in the chat template
  loss curve     reports/<step>_loss.png from trainer_log.jsonl

A full-run validation also writes run_dir/handoff.json for the RL stage: the final checkpoint, profile,
config hash, data checksums, package versions and every deviation from the plan.

Failures are collected and raised as one SftjobsError with the numbers; the report is written first.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from sftjobs import datasets
from sftjobs.errors import SftjobsError
from sftjobs.fsutil import atomic_write_json
from sftjobs.io.trainer_log import read_trainer_log

MEMORY_TOLERANCE = 0.10
MAX_NEW_TOKENS = 32
N_PROMPTS = 3
ACTIVE_FRACTION = 0.10  # samples below this share of a GPU's peak are before loading / after exit

# Keys the rendered YAML owns (paths, resume), not the profile's train: section.
RENDER_KEYS = {"model_name_or_path", "dataset_dir", "dataset", "output_dir", "overwrite_output_dir", "deepspeed",
               "tokenized_path"}
# The user's plan (docs/upstream.md, "The plan the user gave") and the upstream recipe it is built on.
_RECIPE = {"train.learning_rate": 7.0e-6, "train.lr_scheduler_type": "cosine", "train.warmup_ratio": 0.1,
           "train.bf16": True, "train.template": "qwen", "train.finetuning_type": "full",
           "train.overwrite_output_dir": True}
UPSTREAM_PLAN: dict[str, dict[str, Any]] = {
    "toy": {"model": "Qwen/Qwen2.5-0.5B-Instruct", "data.dataset": "arpo_sft_toy", "resources.nodes": 1,
            "resources.gpus_per_node": 1, "train.cutoff_len": 4096, "train.max_samples": 500,
            "train.num_train_epochs": 1.0, "train.save_steps": 50, "train.logging_steps": 5,
            "train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 1, "deepspeed": "z2",
            **_RECIPE},
    "prod": {"model": "Qwen/Qwen2.5-3B-Instruct", "data.dataset": "arpo_sft_54k", "resources.nodes": 1,
             "resources.gpus_per_node": 8, "train.cutoff_len": 15000, "train.max_samples": 1000000,
             "train.num_train_epochs": 3.0, "train.save_steps": 2000, "train.logging_steps": 10,
             "train.per_device_train_batch_size": 1, "train.gradient_accumulation_steps": 2,
             "deepspeed": "z3_offload", **_RECIPE},
}
_WHY = {"train.overwrite_output_dir": "sftjobs keeps it false so a restarted job resumes from its newest checkpoint"}


# ============================================================================ trainer log


def loss_points(entries: Iterable[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, loss) of every training log line; a step logged twice (a resumed run appends) keeps its
    last value."""
    by_step: dict[int, float] = {}
    for e in entries:
        if "loss" in e and e["loss"] is not None and "current_steps" in e:
            try:
                by_step[int(e["current_steps"])] = float(e["loss"])
            except (TypeError, ValueError):
                by_step[int(e["current_steps"])] = math.nan
    return sorted(by_step.items())


def loss_trend(points: list[float]) -> tuple[float, float]:
    """(mean of the first window, mean of the last window), window = max(1, n // 4) points."""
    if not points:
        raise ValueError("no loss values")
    w = max(1, len(points) // 4)
    return sum(points[:w]) / w, sum(points[-w:]) / w


def check_loss(points: list[tuple[int, float]]) -> dict[str, Any]:
    """Finite everywhere and lower at the end than at the start."""
    if not points:
        return {"ok": False, "error": "trainer_log.jsonl has no loss values: the run logged nothing (lower "
                "train.logging_steps) or did not start (see the train step's log)"}
    bad = [(s, v) for s, v in points if not math.isfinite(v)]
    losses = [v for _, v in points]
    w = max(1, len(losses) // 4)
    result: dict[str, Any] = {"points": len(points), "window": w, "first_loss": losses[0], "last_loss": losses[-1]}
    if bad:
        step, value = bad[0]
        result.update(ok=False, non_finite=len(bad), error=(
            f"loss is {value} at step {step} ({len(bad)} of {len(points)} logged values not finite): training "
            "diverged; lower train.learning_rate, keep train.bf16 (not fp16), or check the data for empty answers"))
        return result
    first, last = loss_trend(losses)
    result.update(first_window_mean=first, last_window_mean=last,
                  relative_change=(last - first) / first if first else None)
    if len(losses) < 2:
        result.update(ok=False, error=f"only {len(losses)} logged loss value: cannot tell a trend; lower "
                      "train.logging_steps so the run logs at least a few points")
    elif not last < first:
        result.update(ok=False, error=(
            f"loss did not decrease: mean of the first {w} logged values {first:.4f}, of the last {w} {last:.4f} "
            f"({len(losses)} points, steps {points[0][0]}-{points[-1][0]}); check train.learning_rate (too low "
            "does nothing, too high plateaus), the data (data.shape, template) and that the right model trained"))
    else:
        result["ok"] = True
    return result


def check_completed(entries: list[dict[str, Any]], state: dict[str, Any] | None) -> dict[str, Any]:
    steps = [e for e in entries if "current_steps" in e and "total_steps" in e]
    if not steps:
        return {"ok": False, "error": "trainer_log.jsonl has no step lines: the run did not reach its first "
                "logging step (see the train step's log)"}
    last = steps[-1]
    current, total = int(last["current_steps"]), int(last["total_steps"])
    result: dict[str, Any] = {"current_steps": current, "total_steps": total,
                              "elapsed_time": last.get("elapsed_time")}
    if state is not None:
        result["trainer_state"] = {"global_step": state.get("global_step"), "max_steps": state.get("max_steps")}
    if current != total:
        result.update(ok=False, error=(
            f"training stopped at step {current} of {total} ({current / total:.0%} done): resubmit or resume the "
            "run (it resumes from its newest checkpoint), raise resources.time if it hit the time limit"))
        return result
    if state is not None and state.get("max_steps") and state.get("global_step") != state.get("max_steps"):
        result.update(ok=False, error=(
            f"trainer_state.json says step {state.get('global_step')} of {state.get('max_steps')} although "
            "trainer_log.jsonl reached the end; the output_dir holds a mix of runs: use a fresh output_dir"))
        return result
    result["ok"] = True
    return result


# ============================================================================ GPU memory


def check_memory_stable(samples: list[dict[str, Any]], tolerance: float = MEMORY_TOLERANCE) -> dict[str, Any]:
    """GPU memory of monitor samples ({"time", "gpus": [{"index", "mem_used_mib", ...}], ...}) is stable when,
    for every GPU, the peak in the last half of its active samples is within ``tolerance`` of the peak in
    the first half. Active = from the first to the last sample at >= 10% of that GPU's peak, so the minutes
    before the model is on the GPU and after the process exits do not count.

    Returns {"ok": True|False, "skipped": bool, "gpus": {index: {...}}, "note"|"error"}.
    """
    series: dict[str, list[tuple[float, float]]] = {}
    for i, sample in enumerate(samples):
        t = sample.get("time", i)
        for gpu in sample.get("gpus") or []:
            used = gpu.get("mem_used_mib")
            if used is None:
                continue
            series.setdefault(str(gpu.get("index", "?")), []).append((float(t), float(used)))
    if not series:
        return {"ok": True, "skipped": True, "gpus": {}, "note": "no GPU samples (CPU run or no monitor data)"}
    per_gpu: dict[str, Any] = {}
    unstable = []
    for index, values in sorted(series.items()):
        values.sort()
        peak = max(v for _, v in values)
        active = [k for k, (_, v) in enumerate(values) if peak > 0 and v >= ACTIVE_FRACTION * peak]
        window = [v for _, v in values[active[0]:active[-1] + 1]] if active else []
        if len(window) < 4:
            per_gpu[index] = {"samples": len(values), "active_samples": len(window), "peak_mib": peak,
                              "skipped": "fewer than 4 active samples"}
            continue
        half = len(window) // 2
        first, last = max(window[:half]), max(window[half:])
        growth = (last - first) / first if first else 0.0
        stable = abs(growth) <= tolerance
        per_gpu[index] = {"samples": len(values), "active_samples": len(window), "first_half_peak_mib": first,
                          "last_half_peak_mib": last, "growth": round(growth, 4), "stable": stable}
        if not stable:
            unstable.append(f"GPU {index}: peak {first:.0f} MiB in the first half, {last:.0f} MiB in the last "
                            f"({growth:+.0%})")
    measured = [g for g in per_gpu.values() if "stable" in g]
    if not measured:
        return {"ok": True, "skipped": True, "gpus": per_gpu, "note": "too few active GPU samples to judge"}
    if unstable:
        return {"ok": False, "skipped": False, "gpus": per_gpu, "error": (
            "GPU memory is not stable (more than " f"{tolerance:.0%} between halves): " + "; ".join(unstable)
            + ". Growing memory ends in OOM on a longer run: lower train.cutoff_len or "
            "train.per_device_train_batch_size, or use a higher ZeRO stage (deepspeed:)")}
    return {"ok": True, "skipped": False, "gpus": per_gpu}


def monitor_files(run_dir: Path, train_step: str, only_train_step: bool = False) -> list[Path]:
    """monitor/<train step>.jsonl or monitor/<train step>[-_.]<anything>.jsonl (e.g. one per node). When
    none is named so and ``only_train_step`` (the plan trains once), every monitor/*.jsonl."""
    folder = Path(run_dir) / "monitor"
    if not folder.is_dir():
        return []
    files = sorted(folder.glob("*.jsonl"))
    pattern = re.compile(rf"^{re.escape(train_step)}([-_.].*)?$")
    named = [f for f in files if pattern.match(f.stem)]
    return named or (files if only_train_step else [])


def read_samples(path: Path) -> list[dict[str, Any]]:
    return read_trainer_log(path)  # same format: JSON object lines, a torn last line skipped


def allocator_files(run_dir: Path, train_step: str) -> list[Path]:
    """monitor/allocator/<train step>-<host>-rank<R>.jsonl: written by every training process (lf_train.py)."""
    folder = Path(run_dir) / "monitor" / "allocator"
    return sorted(folder.glob(f"{glob.escape(train_step)}-*.jsonl")) if folder.is_dir() else []


def judge_files(files: list[Path]) -> dict[str, Any]:
    """check_memory_stable per file, merged: ok unless one file is unstable."""
    merged = {f.name: check_memory_stable(read_samples(f)) for f in files}
    problems = [f"{name}: {r['error']}" for name, r in merged.items() if not r["ok"]]
    measured = [r for r in merged.values() if not r.get("skipped")]
    result: dict[str, Any] = {"ok": not problems, "skipped": not measured, "files": merged,
                              "gpus": sum(len(r.get("gpus", {})) for r in measured)}
    if problems:
        result["error"] = "; ".join(problems)
    elif not measured:
        result["note"] = "no GPU samples (CPU run)" if files else "no monitor samples"
    return result


def peak_allocated_mib(files: list[Path]) -> float | None:
    peaks = [gpu.get("peak_alloc_mib") for f in files for sample in read_samples(f) for gpu in sample.get("gpus") or []]
    peaks = [p for p in peaks if isinstance(p, (int, float))]
    return max(peaks) if peaks else None


def estimate_vs_measured(plan: dict[str, Any] | None, peak_mib: float | None) -> dict[str, Any]:
    """The memory plan's allocated estimate (for a cutoff_len-long sample) next to the measured peak: a record
    for the next estimate, not a check (a short run may never meet its longest sample)."""
    if not plan or not peak_mib:
        return {}
    chosen = next((c for c in plan.get("candidates", [])
                   if c.get("stage") == plan.get("stage") and c.get("recompute") == plan.get("recompute")), None)
    if chosen is None:
        return {}
    return {"memory_plan_allocated_gib": chosen["allocated_gib"], "measured_peak_allocated_gib": round(peak_mib / 1024, 2)}


def memory_check(smi_files: list[Path], alloc_files: list[Path]) -> dict[str, Any]:
    """Memory allocated between optimizer steps (model states, and anything that leaks) must be stable. It is
    judged on the trainer's allocator log where there is one: nvidia-smi also shows what the caching allocator
    keeps after the longest samples, which grows on a GPU with room to spare without being a leak."""
    smi = judge_files(smi_files)
    if not alloc_files:
        return {**smi, "basis": "nvidia-smi memory.used"}
    alloc = judge_files(alloc_files)
    result = {**alloc, "basis": "memory allocated between steps (torch allocator, every process)",
              "peak_allocated_mib": peak_allocated_mib(alloc_files), "nvidia_smi": smi}
    if alloc["ok"] and not alloc["skipped"] and not smi["ok"]:
        result["note"] = (f"stable within {MEMORY_TOLERANCE:.0%} on {alloc['gpus']} process(es) by allocated memory; "
                          "nvidia-smi grew (" + smi["error"].split(": ", 1)[-1].split(". ", 1)[0] + "), which is the "
                          "caching allocator keeping blocks for the longest samples, not a leak")
    return result


# ============================================================================ checkpoints + model


def _has_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (
        any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")))


def find_checkpoints(output_dir: Path) -> dict[str, Any]:
    ckpts = []
    for d in output_dir.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if d.is_dir() and m:
            ckpts.append((int(m.group(1)), d))
    ckpts.sort()
    return {"checkpoints": [{"path": str(d), "step": s, "has_weights": _has_model(d)} for s, d in ckpts],
            "final_model": str(output_dir) if _has_model(output_dir) else None}


def _prompt_messages(row: dict[str, Any], entry: dict[str, Any]) -> list[dict[str, str]] | None:
    """System + first user turn of a data row, read through the dataset_info entry's columns."""
    cols = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    messages: list[dict[str, str]] = []
    system = row.get(cols.get("system", "system"))
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": system})
    if entry.get("formatting", "alpaca") == "sharegpt":
        role_tag, content_tag = tags.get("role_tag", "from"), tags.get("content_tag", "value")
        user_tags = {tags.get("user_tag", "human"), "user", "human"}
        for turn in row.get(cols.get("messages", "conversations")) or []:
            if isinstance(turn, dict) and turn.get(role_tag) in user_tags:
                messages.append({"role": "user", "content": str(turn.get(content_tag, ""))})
                break
    else:
        prompt = row.get(cols.get("prompt", "instruction")) or ""
        query = row.get(cols.get("query", "input")) or ""
        if prompt or query:
            messages.append({"role": "user", "content": "\n".join(p for p in (prompt, query) if p)})
    return messages if messages and messages[-1]["role"] == "user" else None


def sample_prompts(dataset_dir: str | os.PathLike, preferred: Iterable[str], n: int = N_PROMPTS) -> dict[str, Any]:
    """Up to ``n`` prompts (as chat messages) from the first rows of a file registered in dataset_info.json:
    the first of ``preferred`` that is registered and readable."""
    from sftjobs.io.data_files import iter_records

    info = json.loads((Path(dataset_dir) / "dataset_info.json").read_text(encoding="utf-8"))
    for name in list(preferred) + list(info):
        entry = info.get(name)
        if not isinstance(entry, dict):
            continue
        path = Path(os.path.join(str(dataset_dir), entry.get("file_name", "")))
        if not path.is_file():
            continue
        prompts = []
        for record in iter_records(path):
            if record.error is None and isinstance(record.value, dict):
                messages = _prompt_messages(record.value, entry)
                if messages:
                    prompts.append(messages)
            if len(prompts) >= n or record.index >= 50 * n:
                break
        if prompts:
            return {"dataset": name, "file": str(path), "prompts": prompts}
    return {"dataset": None, "file": None, "prompts": []}


def load_and_generate(model_dir: str | os.PathLike, prompts: list[list[dict[str, str]]],
                      tokenizer_fallback: str | os.PathLike | None = None, trust_remote_code: bool = False,
                      max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, Any]:
    """Load ``model_dir`` with AutoModelForCausalLM + AutoTokenizer and greedily answer each prompt,
    formatted with the tokenizer's chat template. Raises SftjobsError when the model does not load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    tok_source = model_dir
    if not any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        tok_source = tokenizer_fallback or model_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_source), trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto", trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
        raise SftjobsError(f"{model_dir} does not load with transformers ({type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); the checkpoint is "
                           "incomplete or corrupt: check the train step's log and free disk in output_dir") from None
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    model.to(device)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    results = []
    for messages in prompts:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            formatted = "chat_template"
        else:  # Qwen's format by hand, the `qwen` template LLaMA-Factory trained with
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            text += "<|im_start|>assistant\n"
            formatted = "qwen (tokenizer has no chat template)"
        # no token_type_ids: some tokenizers return them and generate() refuses them (transformers 4.56)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False,
                           return_token_type_ids=False).to(device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 temperature=None, top_p=None, top_k=None)
        new = out[0][inputs["input_ids"].shape[1]:]
        results.append({"prompt": messages[-1]["content"][:500], "prompt_tokens": int(inputs["input_ids"].shape[1]),
                        "output": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": int(new.shape[0]),
                        "formatted_with": formatted})
    return {"model_dir": str(model_dir), "tokenizer": str(tok_source), "device": device, "dtype": str(model.dtype),
            "n_params": n_params, "samples": results, "seconds": round(time.monotonic() - started, 2)}


# ============================================================================ loss curve


def plot_loss(points: list[tuple[int, float]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s, _ in points]
    losses = [v for _, v in points]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, losses, marker="." if len(points) < 60 else None, linewidth=1.2, label="loss")
    w = max(1, len(losses) // 10)
    if len(losses) >= 10:
        smooth = [sum(losses[max(0, i - w + 1):i + 1]) / len(losses[max(0, i - w + 1):i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, linewidth=2, label=f"moving mean ({w})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ============================================================================ hand-off


def _dotted(values: dict[str, Any], key: str) -> Any:
    if key == "model":
        model = values.get("model", {})
        if model.get("source") == "hub":
            return model.get("hub_id")
        return f"{model.get('source')}: {model.get('path') or model.get('local_dir')}"
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def plan_stage(chain: list[str], name: str) -> str | None:
    """toy or prod: the profile itself or the nearest one it extends."""
    for ref in [name] + [Path(p).stem for p in chain]:
        if ref in UPSTREAM_PLAN:
            return ref
    return None


def deviations(profile_values: dict[str, Any], rendered: dict[str, Any], overrides: list[str],
               stage: str | None) -> dict[str, Any]:
    """What differs from the plan: rendered YAML vs the profile's train:, --set overrides, and the
    upstream plan's column for toy / prod."""
    train = profile_values.get("train", {})
    yaml_vs_profile = []
    for key, value in rendered.items():
        if key in RENDER_KEYS:
            continue
        if key not in train:
            yaml_vs_profile.append({"key": key, "yaml": value, "profile": None})
        elif not _same(value, train[key]):
            yaml_vs_profile.append({"key": key, "yaml": value, "profile": train[key]})
    for key, value in train.items():
        if key not in rendered:
            yaml_vs_profile.append({"key": key, "yaml": None, "profile": value})
    vs_plan = []
    if stage:
        for key, planned in UPSTREAM_PLAN[stage].items():
            if key == "train.overwrite_output_dir":
                actual = rendered.get("overwrite_output_dir")
            else:
                actual = _dotted(profile_values, key)
            if not _same(actual, planned):
                item = {"key": key, "plan": planned, "actual": actual}
                if key in _WHY:
                    item["why"] = _WHY[key]
                vs_plan.append(item)
    return {"rendered_yaml_vs_profile": yaml_vs_profile, "overrides": list(overrides),
            "plan_stage": stage, "vs_plan": vs_plan}


def data_checksums(report_path: Path) -> dict[str, Any]:
    """Every sha256 (and row count) in the data step's report, by dotted key."""
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    found: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                key = f"{prefix}.{k}" if prefix else str(k)
                if k in ("sha256", "rows") and isinstance(v, (str, int)):
                    found[key] = v
                else:
                    walk(v, key)

    walk(report, "")
    return found


# ============================================================================ the step


def _train_step_name(ctx, target: str) -> str:
    for step in ctx.plan.steps:
        if step.kind == "train" and (step.target or "full") == target:
            return step.name
    return "train" if target == "full" else "dry_run"


def run(ctx) -> dict[str, Any]:
    target = ctx.step.target or "full"
    cfg = ctx.training_config(target)
    output_dir = Path(cfg["output_dir"])
    report: dict[str, Any] = {"step": ctx.step.name, "target": target, "profile": ctx.plan.profile,
                              "config_hash": ctx.config_hash, "output_dir": str(output_dir), "checks": {}}
    failures: list[str] = []

    def record(name: str, result: dict[str, Any], summary: str) -> None:
        report["checks"][name] = result
        if result.get("ok"):
            tag = "skip" if result.get("skipped") else "ok"
            ctx.log(f"[{tag}] {name}: {summary}")
        else:
            failures.append(f"{name}: {result.get('error')}")
            ctx.log(f"[FAIL] {name}: {result.get('error')}")

    # -- the training log
    log_path = output_dir / "trainer_log.jsonl"
    state_path = output_dir / "trainer_state.json"
    entries: list[dict[str, Any]] = []
    if log_path.is_file():
        entries = read_trainer_log(log_path)
    state = None
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except ValueError:
            state = None
    points = loss_points(entries)
    if not points and state:  # trainer_state.json's log_history has the same losses
        points = sorted({int(h["step"]): float(h["loss"]) for h in state.get("log_history", [])
                         if "loss" in h and "step" in h}.items())
    if not entries and not state:
        record("completed", {"ok": False, "error": f"{log_path} does not exist: the {target} training did not run or "
                             "wrote elsewhere (see the train step's log; output_dir in the profile)"}, "")
    else:
        done = check_completed(entries, state)
        record("completed", done, f"{done.get('current_steps')}/{done.get('total_steps')} steps")
    loss = check_loss(points)
    record("loss", loss, f"finite, {loss.get('first_window_mean', 0):.4f} -> {loss.get('last_window_mean', 0):.4f} "
           f"(mean of first/last {loss.get('window')} of {loss.get('points')} logged values)")
    if points:
        png = ctx.reports_dir / f"{ctx.step.name}_loss.png"
        finite = [(s, v) for s, v in points if math.isfinite(v)]
        if finite:
            plot_loss(finite, png, f"{ctx.plan.profile} {target}: training loss ({ctx.config_hash})")
            report["loss_curve"] = str(png)
            ctx.log(f"loss curve: {png}")

    # -- GPU memory: the trainer's own allocator numbers where it logged them, else the monitor's nvidia-smi
    train_step = _train_step_name(ctx, target)
    n_train = sum(1 for step in ctx.plan.steps if step.kind == "train")
    mem = memory_check(monitor_files(ctx.run_dir, train_step, only_train_step=n_train == 1),
                       allocator_files(ctx.run_dir, train_step))
    mem.update(estimate_vs_measured(getattr(ctx, "memory_plan", None), mem.get("peak_allocated_mib")))
    record("memory", mem, mem.get("note") or f"stable within {MEMORY_TOLERANCE:.0%} on "
           f"{mem.get('gpus', 0)} GPU(s), judged on {mem['basis']}")

    # -- checkpoints, loading and generation
    found = find_checkpoints(output_dir) if output_dir.is_dir() else {"checkpoints": [], "final_model": None}
    with_weights = [c for c in found["checkpoints"] if c["has_weights"]]
    load_dir = found["final_model"] or (with_weights[-1]["path"] if with_weights else None)
    ck: dict[str, Any] = {**found, "loaded": load_dir}
    if load_dir is None:
        ck.update(ok=False, error=f"no final model and no checkpoint-* with weights in {output_dir}: the run saved "
                  "nothing (check train.save_steps against the run's steps, and free disk)")
        record("checkpoints", ck, "")
    else:
        try:
            prompts = sample_prompts(ctx.paths["dataset_dir"], [datasets.TOY, ctx.profile["data"]["dataset"]])
            gen = load_and_generate(load_dir, prompts["prompts"], tokenizer_fallback=ctx.paths.get("model_dir"),
                                    trust_remote_code=bool(cfg.get("trust_remote_code", False)))
            ck["ok"] = True
            report["generation"] = {"prompts_from": prompts["file"], **gen}
            for s in gen["samples"]:
                ctx.log(f"generation: {s['prompt'][:80]!r} -> {s['output'][:120]!r}")
            if not gen["samples"]:
                ctx.log("generation: no prompts found in the data files; loading checked only")
        except SftjobsError as exc:
            ck.update(ok=False, error=str(exc))
        record("checkpoints", ck, f"{len(found['checkpoints'])} checkpoint(s), final model "
               f"{'present' if found['final_model'] else 'absent'}; {load_dir} loads and generates")

    # -- hand-off for the RL stage
    if target == "full" and not failures:
        try:
            profile_file = yaml.safe_load((ctx.run_dir / "profile.yaml").read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            profile_file = {}
        from sftjobs.env import library_versions

        stage = plan_stage(profile_file.get("chain") or [], ctx.plan.profile)
        handoff = {
            "final_checkpoint": load_dir,
            "checkpoints": [c["path"] for c in found["checkpoints"]],
            "profile": ctx.plan.profile,
            "config_hash": ctx.config_hash,
            "run_dir": str(ctx.run_dir),
            "base_model": (ctx.profile["model"].get("hub_id") if ctx.profile["model"].get("source") == "hub"
                           else ctx.paths.get("model_dir")),
            "dataset": ctx.profile["data"]["dataset"],
            "data_checksums": data_checksums(ctx.report_path("data")),
            "versions": (ctx.manifest or {}).get("versions") or library_versions(),
            "training": {k: cfg.get(k) for k in ("template", "cutoff_len", "num_train_epochs", "learning_rate",
                                                 "per_device_train_batch_size", "gradient_accumulation_steps",
                                                 "max_samples") if k in cfg},
            "result": {"steps": report["checks"]["completed"].get("total_steps"),
                       "first_loss": loss.get("first_loss"), "final_loss": loss.get("last_loss")},
            "deviations": deviations(ctx.profile, cfg, profile_file.get("overrides") or [], stage),
            "logs": {"trainer_log": str(log_path), "loss_curve": report.get("loss_curve"),
                     "validate_report": str(ctx.report_path()), "reports": str(ctx.reports_dir)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        path = atomic_write_json(ctx.run_dir / "handoff.json", handoff)
        report["handoff"] = str(path)
        n_dev = len(handoff["deviations"]["vs_plan"]) + len(handoff["deviations"]["rendered_yaml_vs_profile"])
        ctx.log(f"hand-off: {path} (final checkpoint {load_dir}; {n_dev} deviation(s) listed)")

    report["ok"] = not failures
    report["failures"] = failures
    ctx.write_report(report)
    if failures:
        lines = "\n".join(f"  - {f}" for f in failures)
        raise SftjobsError(f"validation of the {target} run ({output_dir}) failed (details in {ctx.report_path()}):\n{lines}")
    ctx.log(f"validation passed; report {ctx.report_path()}")
    return report

"""The pre-flight step: disk estimate, versions, GPU count (fast), and LLaMA-Factory's / DeepSpeed's own
parsers on every rendered config plus the whole step on the CPU demo (train tier)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from sftjobs.errors import SftjobsError
from sftjobs.node.context import StepContext
from sftjobs.planning.batch import optimizer_steps
from sftjobs.planning.dag import build_plan
from sftjobs.planning.run import plan_run
from sftjobs.profile import load_profile
from sftjobs.render import render_files, write_run_dir
from sftjobs.steps import preflight
from sftjobs.steps.preflight import (
    CHECKPOINT_BYTES_PER_PARAM,
    check_gpus,
    check_versions,
    compare_versions,
    estimate_disk,
)

GiB = 2**30


def render_run(tmp_path: Path, profile: str, overrides: list[str] | None = None, dry_run_first: bool = True,
               name: str = "run") -> Path:
    prof = load_profile(profile, overrides or [])
    plan = build_plan(prof, dry_run_first=dry_run_first)
    run_dir = tmp_path / name
    write_run_dir(render_files(plan_run(prof, plan, run_dir, f"{profile}-test", base=tmp_path)), run_dir)
    return run_dir


def gpu_info(n: int, smi: int | None = None, mem: int = 80 * GiB, bf16: bool = True) -> dict:
    return {"torch": n, "nvidia_smi": smi, "names": ["NVIDIA H100 80GB HBM3"] * n, "memory_bytes": [mem] * n,
            "bf16_supported": bf16 if n else None, "cuda_visible_devices": ",".join(map(str, range(n))) or None,
            "torch_cuda": "12.8"}


# ----------------------------------------------------------------------------- disk


def test_optimizer_steps_match_the_plan():
    assert optimizer_steps(500, 1, 2, 1, 1.0) == 250  # toy: 500 samples, batch 2
    # prod: 54.5K samples, 8 GPUs x 1 x 2 = 16 per step, 3 epochs
    assert optimizer_steps(54500, 8, 1, 2, 3.0) == 3 * 3407
    assert optimizer_steps(54500, 8, 1, 2, 3.0, max_steps=63) == 63
    assert optimizer_steps(0, 1, 1, 1, 1.0) == 1


def test_disk_estimate_formula():
    est = estimate_disk(n_params=494_000_000, total_steps=250, save_steps=50)
    assert est["saves"] == 5 and est["kept"] == 5
    assert est["checkpoint_bytes"] == 494_000_000 * CHECKPOINT_BYTES_PER_PARAM
    assert est["need_bytes"] == 5 * 494_000_000 * 16 + 494_000_000 * 4
    limited = estimate_disk(494_000_000, 250, 50, save_total_limit=2)
    assert limited["kept"] == 2
    assert estimate_disk(494_000_000, 250, 50, save_total_limit=20)["kept"] == 5  # never more than it saves
    assert estimate_disk(494_000_000, 251, 50)["saves"] == 6  # the last step saves too
    only_model = estimate_disk(494_000_000, 250, 50, save_only_model=True)
    assert only_model["checkpoint_bytes"] == 494_000_000 * 4


def test_disk_check_fails_with_what_to_change(tmp_path):
    run_dir = render_run(tmp_path, "toy")
    ctx = StepContext.load(run_dir, "preflight")
    result = preflight.check_disk(ctx, n_params=494_000_000, rows=500, free=lambda p: 20 * GiB)
    assert not result["ok"]
    assert "save_total_limit" in result["error"] and "output_dir" in result["error"]
    full = result["estimates"]["full"]
    assert (full["total_steps"], full["kept"]) == (250, 5)
    dry = result["estimates"]["dry_run"]
    assert dry["total_steps"] == 250 and dry["kept"] == 1  # dry run: capped at the full run's 500 samples = save_steps
    # the dry run and the full run share a filesystem here: their needs add up
    (fs,) = result["filesystems"]
    assert fs["need_bytes"] == full["need_bytes"] + dry["need_bytes"]
    ok = preflight.check_disk(ctx, n_params=494_000_000, rows=500, free=lambda p: 10_000 * GiB)
    assert ok["ok"], ok


def test_disk_uses_the_train_steps_world_size(tmp_path):
    run_dir = render_run(tmp_path, "prod", ["resources.nodes=2", "resources.executor=slurm"], dry_run_first=False)
    ctx = StepContext.load(run_dir, "preflight")
    result = preflight.check_disk(ctx, n_params=3_090_000_000, rows=54500, free=lambda p: 10_000 * GiB)
    full = result["estimates"]["full"]
    assert full["world_size"] == 16  # 2 nodes x 8 GPUs, not the one-node preflight job
    assert full["total_steps"] == optimizer_steps(54500, 16, 1, 1, 3.0)  # batch.global_size 16 on 16 GPUs: ga 1


# ----------------------------------------------------------------------------- versions


def test_version_mismatch_names_package_and_both_versions():
    here = {"torch": "2.9.1", "transformers": "5.6.0", "deepspeed": "0.19.8", "llamafactory": "0.9.5",
            "accelerate": "1.11.0", "python": "3.11.7"}
    recorded = {**here, "torch": "2.8.0", "accelerate": "1.10.0", "python": "3.11.9"}
    assert compare_versions(here, recorded) == ["torch 2.9.1 here, 2.8.0 at submit"]  # accelerate is not strict
    result = check_versions(here, recorded, "z2")
    assert not result["ok"]
    assert "torch 2.9.1 here, 2.8.0 at submit" in result["error"]
    assert "launcher.python" in result["error"]
    assert result["warnings"] == ["python 3.11.7 here, 3.11.9 at submit"]
    assert check_versions(here, here, "z2")["ok"]
    assert check_versions(here, None, "z2")["ok"]


def test_missing_deepspeed_only_matters_with_deepspeed():
    here = {"torch": "2.9.1", "transformers": "5.6.0", "deepspeed": None, "llamafactory": "0.9.5",
            "accelerate": "1.11.0", "python": "3.11.7"}
    assert check_versions(here, None, "none")["ok"]
    result = check_versions(here, None, "z3")
    assert not result["ok"] and "deepspeed: none" in result["error"]


# ----------------------------------------------------------------------------- GPUs


def test_gpu_count_matches():
    assert check_gpus(8, gpu_info(8, smi=8))["ok"]
    assert check_gpus(0, gpu_info(0))["ok"]
    warned = check_gpus(0, gpu_info(2, smi=2))
    assert warned["ok"] and warned["warnings"]


def test_fewer_gpus_than_requested():
    result = check_gpus(8, gpu_info(4, smi=4))
    assert not result["ok"]
    assert "4 GPU(s) visible" in result["error"] and "asks for 8" in result["error"]
    assert "resources.gpus_per_node" in result["error"]


def test_more_gpus_than_requested_changes_the_batch():
    result = check_gpus(1, gpu_info(8, smi=8))
    assert not result["ok"] and "global batch" in result["error"]


def test_no_gpu_at_all_and_cpu_only_torch():
    none = check_gpus(1, gpu_info(0))
    assert not none["ok"] and "no GPU is visible" in none["error"]
    cpu_torch = check_gpus(8, gpu_info(0, smi=8))
    assert not cpu_torch["ok"] and "no CUDA support" in cpu_torch["error"]


def test_bf16_on_a_gpu_without_it():
    result = check_gpus(1, gpu_info(1, smi=1, bf16=False), bf16=True)
    assert not result["ok"] and "train.fp16" in result["error"]


def test_gpu_counter_is_what_the_step_uses(monkeypatch):
    monkeypatch.setattr(preflight, "count_gpus", lambda: gpu_info(2, smi=2))
    assert not check_gpus(8, preflight.count_gpus())["ok"]


def test_count_gpus_on_this_machine():
    pytest.importorskip("torch")
    info = preflight.count_gpus()
    assert info["torch"] == len(info["memory_bytes"])


# ----------------------------------------------------------------------------- paths


def test_missing_paths_are_all_listed(tmp_path):
    run_dir = render_run(tmp_path, "toy")
    ctx = StepContext.load(run_dir, "preflight")
    result = preflight.check_paths(ctx.paths, [str(ctx.output_dir("full"))])
    assert not result["ok"]
    assert "model folder" in result["error"]
    assert "arpo_sft_54k.jsonl does not exist" in result["error"] and "arpo_sft_toy.jsonl does not exist" in result["error"]


def test_node_gpu_memory_against_what_deepspeed_auto_assumed():
    assert preflight.gpu_memory_shortfall(80, [int(79.2 * GiB)] * 8) is None  # an "80 GB" H100 reports ~79.2 GiB
    assert preflight.gpu_memory_shortfall(80, [80 * GiB, int(78.5 * GiB)]) is None  # within 2%
    assert preflight.gpu_memory_shortfall(80, []) is None  # nothing to compare (the gpus check reports it)
    short = preflight.gpu_memory_shortfall(80, [80 * GiB, int(39.5 * GiB)])  # the smallest GPU counts
    assert "80 GiB" in short and "39.5 GiB" in short and "set resources.gpu_memory_gib: 39.5 and submit again" in short
    failed = preflight.check_memory("z2", 3_085_938_688, 151936 * 2048, 8, 1, [40 * GiB] * 8, assumed_gib=80)
    assert not failed["ok"] and "resources.gpu_memory_gib: 40" in failed["error"]
    assert preflight.check_memory("z2", 0, 0, 8, 1, [80 * GiB] * 8, assumed_gib=80)["skipped"]  # no weights to size


# ============================================================================= train tier

ALL_RENDERED = [(p, t) for p in ("toy", "prod", "demo", "fast") for t in ("train.yaml", "dry_run.yaml")]


@pytest.mark.train
@pytest.mark.parametrize("profile,name", ALL_RENDERED)
def test_llamafactory_accepts_every_rendered_yaml(tmp_path, profile, name):
    run_dir = render_run(tmp_path, profile)
    cfg = yaml.safe_load((run_dir / "llamafactory" / name).read_text())
    preflight.check_training_yaml(cfg)


@pytest.mark.train
def test_llamafactory_rejects_a_typo_key_by_name(tmp_path):
    run_dir = render_run(tmp_path, "toy")
    cfg = yaml.safe_load((run_dir / "llamafactory" / "train.yaml").read_text())
    cfg["cuttoff_len"] = cfg.pop("cutoff_len")
    with pytest.raises(SftjobsError) as err:
        preflight.check_training_yaml(cfg)
    assert "'cuttoff_len'" in str(err.value) and "did you mean 'cutoff_len'" in str(err.value)


@pytest.mark.train
def test_llamafactory_rejects_a_bad_value(tmp_path):
    run_dir = render_run(tmp_path, "demo")
    cfg = yaml.safe_load((run_dir / "llamafactory" / "train.yaml").read_text())
    cfg["lr_scheduler_type"] = "cosin"
    with pytest.raises(SftjobsError) as err:
        preflight.check_training_yaml(cfg)
    assert "cosin" in str(err.value) and "train:" in str(err.value)


@pytest.mark.train
@pytest.mark.parametrize("stage", ["z1", "z2", "z3", "z3_offload"])
def test_deepspeed_accepts_the_rendered_json_once_autos_are_resolved(tmp_path, stage):
    from transformers.integrations import is_deepspeed_zero3_enabled

    run_dir = render_run(tmp_path, "toy", [f"deepspeed={stage}"])
    ds = run_dir / "deepspeed.json"
    assert "auto" in ds.read_text()
    cfg = yaml.safe_load((run_dir / "llamafactory" / "train.yaml").read_text())
    accelerate_env = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")}
    resolved = preflight.check_deepspeed_config(ds, cfg, hidden_size=896)
    assert resolved["train_micro_batch_size_per_gpu"] == 2
    assert resolved["zero_optimization"]["stage"] == int(stage[1])
    assert "auto" not in json.dumps(resolved)
    assert ("offload_param" in resolved["zero_optimization"]) == (stage == "z3_offload")
    assert not is_deepspeed_zero3_enabled()  # the check leaves no process-wide ZeRO-3 flag behind
    preflight.check_training_yaml(cfg)  # LLaMA-Factory's parser, with the YAML's deepspeed key
    # nor variables that processes started later would inherit (transformers 4.56.2 sets ACCELERATE_USE_DEEPSPEED)
    assert {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")} == accelerate_env


@pytest.mark.train
def test_deepspeed_rejects_a_broken_json(tmp_path):
    run_dir = render_run(tmp_path, "toy")
    ds = run_dir / "deepspeed.json"
    broken = json.loads(ds.read_text())
    broken["zero_optimization"]["stage"] = 7
    ds.write_text(json.dumps(broken))
    cfg = yaml.safe_load((run_dir / "llamafactory" / "train.yaml").read_text())
    with pytest.raises(SftjobsError) as err:
        preflight.check_deepspeed_config(ds, cfg)
    assert "DeepSpeed rejects" in str(err.value) and "stage" in str(err.value)


@pytest.mark.train
def test_deepspeed_memory_estimates_match_upstream_facts():
    # docs/upstream.md: Qwen2.5-3B on 8 GPUs, ZeRO-3: 7.6 GB/GPU of model states, 1.2 GB with offload.
    z3 = preflight.estimate_model_states("z3", 3_090_000_000, 151936 * 2048, 8)
    z3o = preflight.estimate_model_states("z3_offload", 3_090_000_000, 151936 * 2048, 8)
    assert round(z3["gpu_bytes"] / 2**30, 1) == 7.6
    assert round(z3o["gpu_bytes"] / 2**30, 1) == 1.2
    z1 = preflight.estimate_model_states("z1", 3_090_000_000, 151936 * 2048, 8)
    z2 = preflight.estimate_model_states("z2", 3_090_000_000, 151936 * 2048, 8)
    assert z1["gpu_bytes"] - z2["gpu_bytes"] == pytest.approx(2 * 3_090_000_000 * 7 / 8, abs=2)  # unsharded grads
    ok = preflight.check_memory("z3_offload", 3_090_000_000, 151936 * 2048, 8, 1, [80 * GiB] * 8, host_bytes=512 * GiB)
    assert ok["ok"], ok
    too_big = preflight.check_memory("z2", 3_090_000_000, 151936 * 2048, 1, 1, [24 * GiB], host_bytes=512 * GiB)
    assert not too_big["ok"] and "do not fit" in too_big["error"] and "z3" in too_big["error"]
    assert preflight.check_memory("none", 116032, 1000, 0, 1, [])["skipped"]


# ----------------------------------------------------------------------------- the whole step on the CPU demo


@pytest.fixture(scope="module")
def demo_assets(tmp_path_factory):
    pytest.importorskip("llamafactory")
    from sftjobs.io.demo_assets import make_demo_model, make_synthetic_arpo

    base = tmp_path_factory.mktemp("demo-assets")
    data = make_synthetic_arpo(base / "arpo_sft_54k.jsonl", 120)
    make_synthetic_arpo(base / "arpo_sft_toy.jsonl", 100)
    model = make_demo_model(base / "model", data, log=lambda *_: None)
    return base, model


def demo_run(tmp_path: Path, demo_assets, overrides: list[str] | None = None, shape: str = "sharegpt") -> StepContext:
    base, model = demo_assets
    run_dir = render_run(tmp_path, "demo", overrides)
    ctx = StepContext.load(run_dir, "preflight")
    shutil.copytree(model, ctx.paths["model_dir"])
    data_dir = Path(ctx.paths["data_dir"])
    data_dir.mkdir(parents=True)
    if shape == "sharegpt":
        for name in ("arpo_sft_54k.jsonl", "arpo_sft_toy.jsonl"):
            shutil.copy(base / name, data_dir / name)
    else:
        from sftjobs.io.demo_assets import make_synthetic_arpo

        for name in ("arpo_sft_54k.jsonl", "arpo_sft_toy.jsonl"):
            make_synthetic_arpo(data_dir / name, 50, shape=shape)
    return ctx


@pytest.mark.train
def test_preflight_passes_on_the_cpu_demo(tmp_path, demo_assets, monkeypatch):
    monkeypatch.setattr(preflight, "count_gpus", lambda: gpu_info(0))
    ctx = demo_run(tmp_path, demo_assets)
    report = preflight.run(ctx)
    assert report["ok"] and report["failures"] == []
    checks = report["checks"]
    assert set(checks) == {"versions", "patches", "known_bad", "gpus", "paths", "training_yaml", "disk", "memory",
                           "data"}
    assert checks["patches"]["features"]["unpadded_single_rows"]["on"] and checks["known_bad"]["ok"]
    assert checks["memory"]["skipped"]
    data = checks["data"]
    assert (data["sampled_rows"], data["kept_rows"], data["over_cutoff"]) == (64, 64, 0)
    assert 0 < data["max_tokens"] <= 256 and data["example"]["text_head"].startswith("<|im_start|>system")
    assert checks["disk"]["estimates"]["full"]["total_steps"] == 50  # 100 rows, batch 4, 2 epochs
    assert json.loads(ctx.report_path().read_text())["ok"] is True


@pytest.mark.train
def test_preflight_reports_long_samples_against_cutoff(tmp_path, demo_assets, monkeypatch):
    monkeypatch.setattr(preflight, "count_gpus", lambda: gpu_info(0))
    ctx = demo_run(tmp_path, demo_assets, ["train.cutoff_len=64"])
    report = preflight.run(ctx)
    data = report["checks"]["data"]
    assert data["over_cutoff"] == 64 and data["max_tokens"] > 64
    assert any("exceed cutoff_len 64" in w for w in report["warnings"])


@pytest.mark.train
def test_preflight_lists_every_failure(tmp_path, demo_assets, monkeypatch):
    monkeypatch.setattr(preflight, "count_gpus", lambda: gpu_info(0))
    ctx = demo_run(tmp_path, demo_assets, ["resources.gpus_per_node=1"])
    versions = preflight.library_versions()
    ctx.manifest = {"versions": {**versions, "transformers": "4.99.0"}}
    with pytest.raises(SftjobsError) as err:
        preflight.run(ctx)
    text = str(err.value)
    assert "2 problem(s)" in text, text
    assert "gpus: no GPU is visible" in text
    assert f"transformers {versions['transformers']} here, 4.99.0 at submit" in text
    report = json.loads(ctx.report_path().read_text())
    assert report["checks"]["data"]["ok"]  # the other checks still ran


@pytest.mark.train
def test_preflight_fails_when_the_node_has_less_gpu_memory_than_auto_assumed(tmp_path, demo_assets, monkeypatch):
    monkeypatch.setattr(preflight, "count_gpus", lambda: gpu_info(1, mem=40 * GiB))
    ctx = demo_run(tmp_path, demo_assets, ["resources.gpus_per_node=1", "deepspeed=auto"])
    assert ctx.memory_plan["mode"] == "auto" and ctx.memory_plan["inputs"]["gpu_memory_gib"] == 80
    with pytest.raises(SftjobsError) as err:
        preflight.run(ctx)
    assert "set resources.gpu_memory_gib: 40 and submit again" in str(err.value)
    report = json.loads(ctx.report_path().read_text())
    assert not report["checks"]["memory"]["ok"]
    assert report["checks"]["versions"]["ok"]  # deepspeed: auto resolved to the plan's stage


@pytest.mark.train
def test_preflight_catches_data_in_the_wrong_shape(tmp_path, demo_assets, monkeypatch):
    monkeypatch.setattr(preflight, "count_gpus", lambda: gpu_info(0))
    ctx = demo_run(tmp_path, demo_assets, shape="alpaca")  # dataset_info says sharegpt
    with pytest.raises(SftjobsError) as err:
        preflight.run(ctx)
    text = str(err.value)
    assert "data:" in text and "data.shape" in text and "['conversations']" in text and "'instruction'" in text


def simulate_versions(monkeypatch, **versions):
    """The node's installed versions as ``versions`` says (sftjobs.trainer.patches.installed_version is the one
    lookup preflight and the patch registry use); nothing is installed."""
    from sftjobs.trainer import patches

    real = patches.installed_version
    monkeypatch.setattr(patches, "installed_version", lambda name: versions[name] if name in versions else real(name))


@pytest.mark.train
def test_preflight_refuses_fa2_with_transformers_560(tmp_path, demo_assets, monkeypatch):
    monkeypatch.setattr(preflight, "count_gpus", lambda: gpu_info(0))
    simulate_versions(monkeypatch, transformers="5.6.0", flash_attn="2.8.3")
    ctx = demo_run(tmp_path, demo_assets, ["train.flash_attn=fa2"])
    with pytest.raises(SftjobsError) as err:
        preflight.run(ctx)
    text = str(err.value)
    assert "1 problem(s) before any GPU time was spent" in text, text
    assert "known_bad: train.flash_attn fa2 with flash-attn installed and transformers 5.6.0" in text
    assert "pip install 'transformers==5.5.4'" in text and "set train.flash_attn: sdpa" in text
    report = json.loads(ctx.report_path().read_text())
    assert report["versions"]["transformers"] == "5.6.0" and report["versions"]["flash_attn"] == "2.8.3"
    assert report["checks"]["data"]["ok"]  # the other checks still ran


@pytest.mark.train
def test_preflight_reports_the_speed_features_an_unverified_version_turns_off(tmp_path, demo_assets, monkeypatch):
    monkeypatch.setattr(preflight, "count_gpus", lambda: gpu_info(0))
    simulate_versions(monkeypatch, accelerate="1.12.0")
    ctx = demo_run(tmp_path, demo_assets, ["speed.balance_ranks=true"])
    report = preflight.run(ctx)  # a feature that is off is a warning: the run goes on stock
    features = report["checks"]["patches"]["features"]
    assert features["unpadded_single_rows"]["on"] and not features["speed.balance_ranks"]["on"]
    line = ("speed.balance_ranks off: accelerate 1.12.0 not verified (verified: ==1.11.0); runs stock, ~1.10x slower")
    assert any(w.startswith(f"patches: {line}") for w in report["warnings"]), report["warnings"]
    assert report["checks"]["patches"]["summary"] == "on: unpadded_single_rows; off: speed.balance_ranks"

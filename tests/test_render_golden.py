"""The rendered toy and prod run directories, file by file, against tests/golden/ (a change shows as a diff).

Regenerate after an intended change: SFTJOBS_UPDATE_GOLDEN=1 pytest tests/test_render_golden.py
"""

import json
import os
from pathlib import Path

import pytest
import yaml

from sftjobs.planning.dag import build_plan
from sftjobs.profile import load_profile
from sftjobs.render import render_files
from tests.conftest import REPO

GOLDEN = Path(__file__).parent / "golden"


def render(name, dry_run_first, overrides=()):
    profile = load_profile(name, ["launcher.python=/usr/bin/python3", *overrides])
    plan = build_plan(profile, dry_run_first=dry_run_first)
    files = render_files(profile, plan, Path("/RUN"), "golden", base=Path("/BASE"))
    return {rel: text.replace(str(REPO), "<REPO>") for rel, text in files.items()}


@pytest.mark.parametrize("name", ["toy", "prod", "demo"])
def test_rendered_run_directory_matches_golden(name, in_tmp):
    files = render(name, dry_run_first=(name == "prod"))
    folder = GOLDEN / name
    if os.environ.get("SFTJOBS_UPDATE_GOLDEN"):
        for rel, text in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)
    expected = {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*") if p.is_file()}
    assert sorted(files) == sorted(expected)
    for rel, text in files.items():
        assert text == expected[rel], f"{name}/{rel} differs from tests/golden (regenerate if intended)"


# The plan's table (upstream.md), value by value, against what LLaMA-Factory will read.
PLAN_TABLE = {
    "toy": dict(model_name_or_path="/BASE/models/Qwen2.5-0.5B-Instruct", dataset="arpo_sft_toy",
                output_dir="/BASE/checkpoints/qwen0.5b_toy", cutoff_len=4096, max_samples=500, num_train_epochs=1.0,
                save_steps=50, logging_steps=5, per_device_train_batch_size=2, gradient_accumulation_steps=1),
    "prod": dict(model_name_or_path="/data/models/Qwen2.5-3B-Instruct", dataset="arpo_sft_54k",
                 output_dir="/data/checkpoints/qwen2.5-3b-sft", cutoff_len=15000, max_samples=1000000,
                 num_train_epochs=3.0, save_steps=2000, logging_steps=10, per_device_train_batch_size=1,
                 gradient_accumulation_steps=2),
}
RECIPE = dict(stage="sft", do_train=True, finetuning_type="full", trust_remote_code=True, template="qwen",
              overwrite_cache=True, preprocessing_num_workers=16, plot_loss=True, learning_rate=7.0e-6,
              lr_scheduler_type="cosine", warmup_ratio=0.1, bf16=True, ddp_timeout=180000000,
              overwrite_output_dir=False)


@pytest.mark.parametrize("name", ["toy", "prod"])
def test_training_yaml_matches_the_plan_value_by_value(name, in_tmp):
    cfg = yaml.safe_load(render(name, dry_run_first=True)["llamafactory/train.yaml"])
    for key, value in {**PLAN_TABLE[name], **RECIPE}.items():
        assert cfg[key] == value, key
    assert cfg["dataset_dir"] == "/RUN/dataset"


def test_prod_resources_and_deepspeed(in_tmp):
    files = render("prod", dry_run_first=True)
    plan = json.loads(files["plan.json"])
    train = next(s for s in plan["steps"] if s["name"] == "train")
    assert train["resources"]["nodes"] == 1 and train["resources"]["gpus_per_node"] == 8
    assert train["after"] == ["validate_dry_run"]
    # deepspeed: auto -> the memory plan for 8 x 80 GiB, cutoff 15000, Liger: ZeRO-1 without recompute
    memory = plan["memory_plan"]
    assert (memory["stage"], memory["recompute"]) == ("z1", False)
    assert memory["inputs"]["world"] == 8 and memory["inputs"]["gpu_memory_gib"] == 80
    assert memory["global_batch"] == 16 and memory["gradient_accumulation_steps"] == 2
    ds = json.loads(files["deepspeed.json"])
    assert ds["zero_optimization"]["stage"] == 1 and "offload_optimizer" not in ds["zero_optimization"]
    assert yaml.safe_load(files["llamafactory/train.yaml"])["disable_gradient_checkpointing"] is True
    # the plan's own config stays one --set file away (bench item A)
    sets = [line for line in (REPO / "bench" / "plan_config.sets").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    plan_files = render_files(load_profile("prod", sets), build_plan(load_profile("prod", sets)), Path("/RUN"), "p",
                              base=Path("/BASE"))
    plan_ds = json.loads(plan_files["deepspeed.json"])["zero_optimization"]
    assert plan_ds["stage"] == 3 and plan_ds["offload_optimizer"]["device"] == "cpu"
    assert plan_ds["offload_param"]["device"] == "cpu" and "memory_plan" not in json.loads(plan_files["plan.json"])
    toy_ds = json.loads(render("toy", dry_run_first=False)["deepspeed.json"])
    assert toy_ds["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in toy_ds["zero_optimization"]
    assert 'NPROC_PER_NODE=8' in files["steps/train.sh"] and "FORCE_TORCHRUN=1" in files["steps/train.sh"]


def test_dry_run_yaml_has_its_own_output_dir_and_shares_the_tokenized_cache(in_tmp):
    files = render("prod", dry_run_first=True)
    full = yaml.safe_load(files["llamafactory/train.yaml"])
    dry = yaml.safe_load(files["llamafactory/dry_run.yaml"])
    assert dry["output_dir"] != full["output_dir"]
    assert dry["tokenized_path"] == full["tokenized_path"]
    # 1000 samples at 8 GPUs x 1 x 2 = 16 per step -> 63 optimizer steps
    assert dry["max_steps"] == 63 and dry["save_steps"] == 63
    assert "max_steps" not in full


def test_dataset_info_has_both_entries(in_tmp):
    info = json.loads(render("toy", dry_run_first=False)["dataset/dataset_info.json"])
    assert set(info) == {"arpo_sft_54k", "arpo_sft_toy"}
    for entry in info.values():
        assert entry["formatting"] == "sharegpt"
        assert entry["columns"] == {"messages": "conversations", "system": "system"}


def test_run_id_in_output_dir_gives_each_run_its_own_checkpoints(in_tmp):
    profile = load_profile("demo")
    plan = build_plan(profile)
    first = yaml.safe_load(render_files(profile, plan, Path("/RUN1"), "demo-a", base=Path("/B"))["llamafactory/train.yaml"])
    second = yaml.safe_load(render_files(profile, plan, Path("/RUN2"), "demo-b", base=Path("/B"))["llamafactory/train.yaml"])
    assert first["output_dir"] == "/B/checkpoints/demo/demo-a" and second["output_dir"] == "/B/checkpoints/demo/demo-b"
    toy = load_profile("toy")  # the plan's stages keep one output_dir, so a new run resumes what is there
    assert "{run_id}" not in toy.values["output_dir"]

"""bench/items.txt is the one list of benchmark items: bench_prod.sh runs it, summarize_prod.py describes it,
bench/README.md gives each item's current numbers. Each gpu item renders with its overrides, and its command is the
train step's own with the step timer added (bench/train_command.py)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ITEMS = load("summarize_prod").read_items()


def test_the_items_are_the_ones_behind_the_readmes_numbers():
    assert list(ITEMS) == ["A", "P", "P_nodsfused", "P_fused", "P_compile", "P_zerostock", "P_unfused", "P_inplace",
                           "P_liger1", "P_recompute_all", "fast", "fast_fused", "fast_zerostock", "fast_unfused",
                           "fast_inplace", "fast_liger1", "fast_recompute_all",
                           "chain", "toy",
                           "requeue_save", "data_step", "submit_status", "queue_waits"]
    assert all(item["where"] in ("gpu", "chain", "device", "cpu") and item["what"] for item in ITEMS.values())
    for item in ITEMS.values():
        if item["where"] in ("device", "cpu"):
            assert (REPO / item["overrides"].split()[-1]).is_file(), item


def test_bench_readme_gives_numbers_for_every_item():
    text = (REPO / "bench" / "README.md").read_text(encoding="utf-8")
    table = text[text.index("## Current numbers"):]
    for name in ITEMS:
        assert re.search(rf"^\| `{re.escape(name)}` \|", table, re.M), name
    assert not re.search(r"\b[Ss]ession \d", text)


def overrides(item: dict[str, str], gpus: int = 1, gib: int = 139) -> list[str]:
    out: list[str] = []
    for word in item["overrides"].split():
        if word.startswith("@"):
            out += [line for line in (REPO / word[1:]).read_text().splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
        else:
            out.append(word.replace("{GPUS2}", str(2 * gpus)).replace("{GPU_GIB}", str(gib)))
    return out


FAST_FLAGS = ["--balance-ranks", "--per-sample-attention", "--lean-zero-step", "--fused-zero-update",
              "--cudnn-attention-bucket", "256", "--liger-chunk-mem-const", "8"]
PROD_FLAGS = ["--balance-ranks", "--pack-rank-samples", "--skip-idle-micro-steps", "--split-long-samples",
              "--lean-zero-step", "--fused-zero-update", "--liger-chunk-mem-const", "8"]


@pytest.mark.parametrize("name, flags", [
    ("A", []),
    ("P", PROD_FLAGS),
    ("P_nodsfused", PROD_FLAGS),
    ("P_fused", PROD_FLAGS),
    ("P_zerostock", ["--balance-ranks", "--pack-rank-samples", "--skip-idle-micro-steps", "--split-long-samples",
                     "--fused-zero-update", "--liger-chunk-mem-const", "8"]),
    ("fast_zerostock", ["--balance-ranks", "--per-sample-attention", "--fused-zero-update",
                        "--cudnn-attention-bucket", "256", "--liger-chunk-mem-const", "8"]),
    ("fast", FAST_FLAGS),
    ("fast_fused", FAST_FLAGS),
    ("P_unfused", [f for f in PROD_FLAGS if f != "--fused-zero-update"]),
    ("fast_unfused", [f for f in FAST_FLAGS if f != "--fused-zero-update"]),
    ("P_inplace", PROD_FLAGS),
    ("fast_inplace", FAST_FLAGS),
    ("P_liger1", PROD_FLAGS[:-2]),
    ("fast_liger1", FAST_FLAGS[:-2]),
])
def test_each_gpu_item_runs_the_train_steps_command_with_the_timer(name, flags, tmp_path):
    item = ITEMS[name]
    sets = [arg for value in overrides(item) for arg in ("--set", value)]
    render = subprocess.run([sys.executable, "-m", "sftjobs", "render", item["profile"], "--out", str(tmp_path / "r"),
                             "--set", "resources.gpus_per_node=1", *sets], capture_output=True, text=True, cwd=REPO)
    assert render.returncode == 0, render.stdout[-2000:] + render.stderr[-2000:]
    script = load("train_command").script(tmp_path / "r", 1, 29611).splitlines()
    command = script[-1].split()
    entry = command.index("sftjobs.trainer.entry")
    assert command[entry + 1:] == [*flags, "--callback", "bench.step_timer:callbacks",
                                   str(tmp_path / "r" / "llamafactory" / "train.yaml")]
    train = (tmp_path / "r" / "llamafactory" / "train.yaml").read_text()
    assert ("deepspeed:" in train) == (name != "P_nodsfused")
    assert ("export TORCH_CUDNN_SDPA_DEPRIORITIZED=1" in script) == (name != "A")  # launcher.setup
    if name != "P_nodsfused":
        zero = json.loads((tmp_path / "r" / "deepspeed.json").read_text())["zero_optimization"]
        in_place = name in ("P_inplace", "fast_inplace")
        assert zero["stage"] == (3 if name == "A" else 1), (name, zero)  # the plan's pick on one 139 GiB card
        assert zero["contiguous_gradients"] is (not in_place), (name, zero)

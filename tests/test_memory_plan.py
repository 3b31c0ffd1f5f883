"""The memory plan (deepspeed: auto, batch.global_size): parameter counts, the estimate against measured
GPU memory, the choice of ZeRO stage and recompute, the batch layout, and where the plan is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sftjobs.cli import main
from sftjobs.errors import SftjobsError
from sftjobs.planning import memory as mp
from sftjobs.planning.dag import build_plan
from sftjobs.planning.run import plan_run
from sftjobs.profile import load_profile
from sftjobs.render import render_files
from tests.test_render_golden import render

NO_MODEL_DIR = "/nonexistent/model"  # no config.json at render time: the built-in table gives the shape
# The hub's config.json of Qwen/Qwen2.5-3B-Instruct (the keys the estimate reads).
QWEN25_3B_CONFIG = {"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                    "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                    "tie_word_embeddings": True, "max_position_embeddings": 32768}


def plan_for(*overrides: str, profile: str = "prod", model_dir: str = NO_MODEL_DIR) -> dict:
    return mp.plan_memory(load_profile(profile, list(overrides)), model_dir)


def auto_3b(gpus: int, gib: float = 80, *extra: str) -> dict:
    """prod (Qwen2.5-3B, cutoff 15000, bs 1) with deepspeed: auto and Liger on ``gpus`` GPUs of ``gib``."""
    return plan_for("deepspeed=auto", "train.enable_liger_kernel=true", f"resources.gpus_per_node={gpus}",
                    f"resources.gpu_memory_gib={gib}", *extra)


# ----------------------------------------------------------------------------- model size


def test_parameter_counts_of_the_known_shapes():
    assert mp.shape_from_table("qwen2.5-3b").params == 3_085_938_688
    assert mp.shape_from_table("qwen2.5-0.5b").params == 494_032_768
    for hub_id, params in (("Qwen/Qwen2.5-3B-Instruct", 3_085_938_688), ("Qwen/Qwen2.5-0.5B-Instruct", 494_032_768)):
        assert mp.model_shape({"source": "hub", "hub_id": hub_id}, NO_MODEL_DIR).params == params


def test_config_json_in_the_model_dir_wins_over_the_table(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_3B_CONFIG))
    shape = mp.model_shape({"source": "hub", "hub_id": "Qwen/Qwen2.5-0.5B-Instruct"}, str(tmp_path))
    assert shape.params == 3_085_938_688 and shape.source == str(tmp_path / "config.json")
    untied = mp.shape_from_config({**QWEN25_3B_CONFIG, "tie_word_embeddings": False})
    assert untied.params == 3_085_938_688 + 151936 * 2048  # a separate lm_head
    llama = mp.shape_from_config({**QWEN25_3B_CONFIG, "model_type": "llama"})  # no q/k/v biases
    assert llama.params == 3_085_938_688 - 36 * (2048 + 2 * 256)


def test_unknown_model_without_config_names_what_to_set():
    with pytest.raises(SftjobsError) as err:
        mp.model_shape({"source": "hub", "hub_id": "someone/unknown-7b"}, NO_MODEL_DIR)
    assert "someone/unknown-7b" in str(err.value) and "model.local_dir" in str(err.value)
    assert "deepspeed" in str(err.value)


@pytest.mark.train
def test_parameter_count_matches_transformers():
    import torch
    from transformers import AutoModelForCausalLM

    from sftjobs.io.demo_assets import SYNTHETIC_SHAPES, qwen2_config_from_dims

    class Tokenizer:  # what the config builder asks of a tokenizer
        def __len__(self):
            return 1000

        def convert_tokens_to_ids(self, token):
            return 0

    for name in ("qwen2.5-0.5b", "qwen2.5-3b"):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(qwen2_config_from_dims(SYNTHETIC_SHAPES[name], Tokenizer()))
        assert model.num_parameters() == mp.shape_from_table(name).params, name


# ----------------------------------------------------------------------------- calibration

GiB = 2**30
SHAPE_3B = mp.shape_from_table("qwen2.5-3b")
# Measured with the Qwen2.5-3B shape, bf16, on H100/H200 (bench/results): torch's peak allocated GiB.
# The estimate must be within 15% of each.
CALIBRATION = [
    # plain PyTorch probe, Liger, one sample, no recompute: activations only
    ("probe 3750 tokens", lambda: sum(mp.activation_bytes(SHAPE_3B, mp.Workload(3750, 1, True), False).values()) / GiB,
     12.3),
    ("probe 7300 tokens", lambda: sum(mp.activation_bytes(SHAPE_3B, mp.Workload(7300, 1, True), False).values()) / GiB,
     23.3),
    ("probe 14980 tokens", lambda: sum(mp.activation_bytes(SHAPE_3B, mp.Workload(14980, 1, True), False).values()) / GiB,
     47.1),
    # the same with bf16 weights and gradients on the GPU (no DeepSpeed, no optimizer)
    ("probe 14980 + weights and grads",
     lambda: (sum(mp.activation_bytes(SHAPE_3B, mp.Workload(14980, 1, True), False).values()) + 4 * SHAPE_3B.params)
     / GiB, 58.6),
    # sftjobs' prod proposal S: ZeRO-2 on 4 GPUs, Liger, no recompute, cutoff 15000, bs 1
    ("S: z2, 4 GPUs, no recompute",
     lambda: mp.estimate(SHAPE_3B, "z2", False, 4, mp.Workload(15000, 1, True), 80)["allocated_gib"], 64.4),
    # the plan's prod A: ZeRO-3 + offload, recompute, no Liger (full fp32 logits), 4 GPUs
    ("A: z3_offload, 4 GPUs, recompute, no Liger",
     lambda: mp.estimate(SHAPE_3B, "z3_offload", True, 4, mp.Workload(15000, 1, False), 80)["allocated_gib"], 29.7),
    # fastseg: neat_packing 15000-token packs with per-sample attention (no 4D mask), ZeRO-2, recompute, Liger
    ("fast: z2, 4 GPUs, recompute, packs",
     lambda: mp.estimate(SHAPE_3B, "z2", True, 4, mp.Workload(15000, 1, True, "fa2"), 80)["allocated_gib"], 20.8),
    # fast on 1x H100 80GB (2026-12-06): ZeRO-1 with recompute, where the optimizer step makes the peak; DeepSpeed's
    # own update (its fp32 gradient copy) and speed.fused_zero_update
    ("fast: z1, 1 GPU, recompute, DeepSpeed's update",
     lambda: mp.estimate(SHAPE_3B, "z1", True, 1, mp.Workload(15000, 1, True, "fa2"), 80)["allocated_gib"], 63.3),
    ("fast: z1, 1 GPU, recompute, fused update",
     lambda: mp.estimate(SHAPE_3B, "z1", True, 1, mp.Workload(15000, 1, True, "fa2", fused_update=True),
                         80)["allocated_gib"], 51.8),
]


@pytest.mark.parametrize("name,estimated,measured", CALIBRATION, ids=[c[0] for c in CALIBRATION])
def test_estimate_matches_measured_memory(name, estimated, measured):
    value = estimated()
    assert abs(value - measured) <= 0.15 * measured, f"{name}: estimated {value:.1f} GiB, measured {measured} GiB"


def test_more_gpus_need_less_memory_and_recompute_less_than_none():
    w = mp.Workload(15000, 1, True)
    for stage in ("z1", "z2", "z3"):
        per_gpu = [mp.estimate(SHAPE_3B, stage, False, n, w, 80)["allocated_gib"] for n in (1, 2, 4, 8)]
        assert per_gpu == sorted(per_gpu, reverse=True), stage
        assert mp.estimate(SHAPE_3B, stage, True, 4, w, 80)["allocated_gib"] < per_gpu[2]
    order = [mp.estimate(SHAPE_3B, s, True, 8, w, 80)["allocated_gib"] for s in ("z1", "z2", "z3", "z3_offload")]
    assert order == sorted(order, reverse=True)
    no_liger = mp.estimate(SHAPE_3B, "z2", True, 8, mp.Workload(15000, 1, False), 80)
    assert no_liger["logits_gib"] > 20  # 15000 x 151936 logits in bf16 + fp32


# ----------------------------------------------------------------------------- the choice


def assert_first_fit(plan: dict) -> dict:
    """The rule: the chosen layout fits and every layout before it in the speed order does not."""
    candidates = plan["candidates"]
    chosen = next(c for c in candidates if (c["stage"], c["recompute"]) == (plan["stage"], plan["recompute"]))
    assert chosen["fits"] and chosen["total_gib"] <= plan["usable_gib"]
    assert not any(c["fits"] for c in candidates[:candidates.index(chosen)])
    assert [(c["stage"], c["recompute"]) for c in candidates] == list(mp.CANDIDATES)
    return chosen


def test_3b_on_8x80_trains_without_recompute():
    plan = auto_3b(8)
    assert_first_fit(plan)
    assert plan["stage"] in ("z1", "z2") and plan["recompute"] is False
    assert plan["inputs"]["params"] == 3_085_938_688 and plan["inputs"]["world"] == 8
    assert plan["inputs"]["liger"] is True and plan["inputs"]["cutoff_len"] == 15000
    assert "fastest layout that fits" in plan["reason"]
    json.dumps(plan)  # plain JSON for plan.json and the manifest


def test_3b_on_2x24_needs_recompute_or_offload():
    plan = auto_3b(2, 24)
    assert_first_fit(plan)
    assert plan["recompute"] or plan["stage"] == "z3_offload"


def test_no_layout_fits_says_what_to_change():
    with pytest.raises(SftjobsError) as err:
        auto_3b(1, 16, "train.enable_liger_kernel=false")
    msg = str(err.value)
    assert "no layout that fits" in msg and "resources.gpu_memory_gib is 16" in msg
    assert "more GPUs" in msg and "train.cutoff_len" in msg and "enable_liger_kernel" in msg
    assert "prod.yaml" in msg


def test_profile_that_sets_recompute_keeps_it():
    on = auto_3b(8, 80, "train.disable_gradient_checkpointing=false")
    assert on["recompute"] is True and on["inputs"]["recompute_from_profile"] is True
    assert all(c["recompute"] for c in on["candidates"]) and on["stage"] == "z1"
    off = auto_3b(2, 80, "train.disable_gradient_checkpointing=true")  # no z1/z2/z3 fits without recompute on 2
    assert off["recompute"] is False and off["stage"] == "z3_offload"
    assert [c["stage"] for c in off["candidates"]] == list(mp.STAGE_ORDER)
    assert not any(c["fits"] for c in off["candidates"][:-1])
    files = render("prod", False, ["deepspeed=auto", "resources.gpus_per_node=2", "train.enable_liger_kernel=true",
                                   "train.disable_gradient_checkpointing=true"])
    assert yaml.safe_load(files["llamafactory/train.yaml"])["disable_gradient_checkpointing"] is True
    assert json.loads(files["deepspeed.json"])["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_gpu_memory_decides():
    small, large = auto_3b(4, 40), auto_3b(4, 141)
    assert small["recompute"] is True
    assert large["stage"] == "z1" and large["recompute"] is False


# ----------------------------------------------------------------------------- batch layout


@pytest.mark.parametrize("gpus,ga", [(8, 2), (4, 4), (2, 8), (1, 16)])
def test_global_size_gives_gradient_accumulation(gpus, ga, in_tmp):
    fixed = ["deepspeed=z3_offload", "batch.global_size=16", f"resources.gpus_per_node={gpus}"]  # bs 1
    plan = plan_for(*fixed)
    assert plan["gradient_accumulation_steps"] == ga and plan["global_batch"] == 16
    assert plan["mode"] == "fixed" and plan["stage"] == "z3_offload"
    files = render("prod", True, fixed)
    for name in ("train.yaml", "dry_run.yaml"):
        assert yaml.safe_load(files[f"llamafactory/{name}"])["gradient_accumulation_steps"] == ga


def test_global_size_that_does_not_divide_is_an_error():
    with pytest.raises(SftjobsError) as err:
        load_profile("prod", ["batch.global_size=16", "resources.gpus_per_node=3"])
    msg = str(err.value)
    assert "batch.global_size 16" in msg and "3 GPU(s)" in msg and "per_device_train_batch_size 1" in msg
    assert "15 (ga 5) or 18 (ga 6)" in msg
    with pytest.raises(SftjobsError, match=r"use batch.global_size 8 \(ga 1\)"):
        load_profile("prod", ["batch.global_size=4"])  # fewer than one sample per GPU


def test_global_size_with_auto(in_tmp):
    plan = auto_3b(4, 80, "batch.global_size=32")
    assert (plan["per_device_train_batch_size"], plan["gradient_accumulation_steps"], plan["global_batch"]) == (1, 8, 32)
    assert mp.summary_line(plan).startswith(f"memory plan: {plan['stage']}, no recompute, bs 1 x ga 8 x 4 GPUs = 32; est.")


# ----------------------------------------------------------------------------- where the plan goes


def test_nothing_planned_without_auto_or_global_size(in_tmp):
    assert plan_for("deepspeed=z3_offload", "batch.global_size=null") is None and plan_for(profile="toy") is None
    assert "memory_plan" not in json.loads(render("toy", False)["plan.json"])


def test_render_uses_the_plan_and_plan_json_records_it(in_tmp):
    files = render("prod", True, ["deepspeed=auto", "train.enable_liger_kernel=true"])
    memory = json.loads(files["plan.json"])["memory_plan"]
    assert memory["mode"] == "auto" and memory["stage"] == "z1" and memory["recompute"] is False
    assert json.loads(files["deepspeed.json"])["zero_optimization"]["stage"] == 1
    train = yaml.safe_load(files["llamafactory/train.yaml"])
    assert train["disable_gradient_checkpointing"] is True and train["gradient_accumulation_steps"] == 2
    profile = yaml.safe_load(files["profile.yaml"])  # the profile as written, not as planned
    assert profile["values"]["deepspeed"] == "auto" and "disable_gradient_checkpointing" not in profile["values"]["train"]
    # a model already in model.local_dir: its config.json gives the shape
    prof = load_profile("prod", ["deepspeed=auto", f"model.local_dir={in_tmp / 'm'}"])
    (in_tmp / "m").mkdir()
    (in_tmp / "m" / "config.json").write_text(json.dumps({**QWEN25_3B_CONFIG, "num_hidden_layers": 2}))
    files = render_files(plan_run(prof, build_plan(prof), in_tmp / "run", "r1", base=in_tmp))
    memory = json.loads(files["plan.json"])["memory_plan"]
    assert memory["inputs"]["shape_source"] == str(in_tmp / "m" / "config.json") and memory["inputs"]["shape"]["layers"] == 2


def test_render_and_preview_print_the_plan_and_the_manifest_records_it(in_tmp, capsys):
    sets = ["--set", "deepspeed=auto", "--set", "train.enable_liger_kernel=true", "--set", "resources.gpus_per_node=4",
            "--set", "batch.global_size=16"]
    assert main(["render", "prod", *sets, "--out", str(in_tmp / "out")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("memory plan:"))
    assert line.startswith("memory plan: z2, no recompute, bs 1 x ga 4 x 4 GPUs = 16; est. ") and line.endswith(" of 80 GiB")
    assert main(["submit", "prod", *sets, "--executor", "local", "--preview"]) == 0
    assert f"# {line}\n" in capsys.readouterr().out

    from sftjobs import submit as submitting

    prepared = submitting.prepare("prod", [s for s in sets if s != "--set"], False, "local")

    class Recorder:  # stands in for the backend: queues nothing
        def check(self, plan):
            return ""

        def submit(self, plan, run_dir):
            return {s.name: str(i) for i, s in enumerate(plan.steps)}

    prepared.executor = Recorder()
    manifest = submitting.submit(prepared)
    assert manifest["memory_plan"] == json.loads((prepared.run_dir / "plan.json").read_text())["memory_plan"]
    on_disk = json.loads((prepared.run_dir / "manifest.json").read_text())
    assert on_disk["memory_plan"]["stage"] == "z2" and on_disk["memory_plan"]["gradient_accumulation_steps"] == 4


def test_step_context_carries_the_plan(in_tmp):
    from sftjobs.node.context import StepContext
    from sftjobs.render import write_run_dir

    prof = load_profile("toy", ["deepspeed=auto"])
    run_dir = in_tmp / "run"
    write_run_dir(render_files(plan_run(prof, build_plan(prof), run_dir, "r", base=in_tmp)), run_dir)
    ctx = StepContext.load(run_dir, "preflight")
    assert ctx.profile["deepspeed"] == "auto" and ctx.memory_plan["mode"] == "auto"
    assert ctx.memory_plan["inputs"]["params"] == 494_032_768


# ----------------------------------------------------------------------------- DeepSpeed accepts what auto renders


@pytest.mark.train
def test_llamafactory_and_deepspeed_accept_what_auto_rendered(in_tmp):
    from sftjobs.render import write_run_dir
    from sftjobs.steps import preflight

    prof = load_profile("prod", ["deepspeed=auto", "train.enable_liger_kernel=true"])
    run_dir = in_tmp / "run"
    write_run_dir(render_files(plan_run(prof, build_plan(prof), run_dir, "r", base=Path(in_tmp))), run_dir)
    cfg = yaml.safe_load((run_dir / "llamafactory" / "train.yaml").read_text())
    assert cfg["disable_gradient_checkpointing"] is True
    preflight.check_training_yaml(cfg)  # LLaMA-Factory's own parser, with the key the plan added
    resolved = preflight.check_deepspeed_config(run_dir / "deepspeed.json", cfg, hidden_size=2048)
    assert resolved["zero_optimization"]["stage"] == 1
    assert resolved["train_batch_size"] == 1 * 2 * 1  # transformers' world size on this CPU: 1 process


def test_the_fused_update_lowers_the_step_peak_where_the_plan_knows_it_applies():
    """fast on one 80 GB GPU (ZeRO-1 with recompute, where the optimizer step makes the peak): prod and fast turn
    speed.fused_zero_update on, and the estimate drops by the fp32 gradient copy it no longer makes; an optimizer
    that is not torch's AdamW keeps DeepSpeed's step and the estimate with it."""
    fused = plan_for("resources.gpus_per_node=1", "batch.global_size=null", profile="fast")
    stock = plan_for("resources.gpus_per_node=1", "batch.global_size=null", "speed.fused_zero_update=false",
                     profile="fast")
    other = plan_for("resources.gpus_per_node=1", "batch.global_size=null", "train.optim=adafactor", profile="fast")
    assert (fused["stage"], fused["recompute"]) == (stock["stage"], stock["recompute"]) == ("z1", True)
    assert fused["inputs"]["fused_zero_update"] and not stock["inputs"]["fused_zero_update"]
    assert not other["inputs"]["fused_zero_update"] and other["estimate_gib"] == stock["estimate_gib"]
    saved = stock["estimate_gib"] - fused["estimate_gib"]
    assert 5.0 < saved < 7.0, (stock["estimate_gib"], fused["estimate_gib"])  # 2 of the 4 bytes per parameter

"""The validate step: loss trend, completion, GPU memory stability, hand-off (fast, synthetic logs), and
loading + generation on a real tiny Qwen2 (train tier)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from sftjobs.errors import SftjobsError
from sftjobs.node.context import StepContext
from sftjobs.planning.dag import build_plan
from sftjobs.profile import load_profile
from sftjobs.render import render_files, write_run_dir
from sftjobs.steps import validate
from sftjobs.steps.validate import (
    check_completed,
    check_loss,
    check_memory_stable,
    loss_points,
    loss_trend,
    read_trainer_log,
)

# ----------------------------------------------------------------------------- helpers


def trainer_log(path: Path, losses: list[float], total: int | None = None, every: int = 2, final: bool = True) -> Path:
    """A trainer_log.jsonl as LLaMA-Factory writes it: one line per logging step, then a final line
    without loss at current_steps == total_steps."""
    total = total if total is not None else every * len(losses)
    lines = []
    for i, loss in enumerate(losses, 1):
        step = i * every
        lines.append({"current_steps": step, "total_steps": total, "loss": loss, "lr": 1e-5, "epoch": step / total,
                      "percentage": round(step / total * 100, 2), "elapsed_time": "0:00:01",
                      "remaining_time": "0:00:01"})
    if final:
        lines.append({"current_steps": total, "total_steps": total, "epoch": 1.0, "percentage": 100.0,
                      "elapsed_time": "0:00:10", "remaining_time": "0:00:00"})
    path.parent.mkdir(parents=True, exist_ok=True)
    # json.dumps writes NaN for float("nan"), exactly like LLaMA-Factory (Python's json) does.
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def decreasing(n: int = 40) -> list[float]:
    return [2.0 * math.exp(-i / 15) + 0.5 + 0.02 * ((-1) ** i) for i in range(n)]


def gpu_sample(t: float, used: list[float], total: float = 81559) -> dict:
    return {"time": t, "gpus": [{"index": i, "util": 90, "mem_used_mib": u, "mem_total_mib": total}
                                for i, u in enumerate(used)], "rss_mb": 1000, "ckpt_bytes": 0}


def render_run(tmp_path: Path, profile: str = "demo", overrides: list[str] | None = None,
               dry_run_first: bool = False) -> Path:
    prof = load_profile(profile, overrides or [])
    plan = build_plan(prof, dry_run_first=dry_run_first)
    run_dir = tmp_path / "run"
    write_run_dir(render_files(prof, plan, run_dir, f"{profile}-test", base=tmp_path), run_dir)
    return run_dir


# ----------------------------------------------------------------------------- loss


def test_loss_trend_windows():
    assert loss_trend([4.0, 3.0, 2.0, 1.0]) == (4.0, 1.0)
    first, last = loss_trend([8, 8, 6, 6, 4, 4, 2, 2])  # window 2
    assert (first, last) == (8.0, 2.0)
    assert loss_trend([5.0]) == (5.0, 5.0)
    assert loss_trend([3, 2, 1]) == (3.0, 1.0)  # n // 4 == 0 -> window 1


def test_decreasing_loss_passes():
    points = list(enumerate(decreasing(), 1))
    result = check_loss(points)
    assert result["ok"], result
    assert result["last_window_mean"] < result["first_window_mean"]
    assert result["window"] == 10


@pytest.mark.parametrize("losses", [[1.5] * 20, [1.0 + 0.05 * i for i in range(20)]], ids=["flat", "increasing"])
def test_flat_or_increasing_loss_fails(losses):
    result = check_loss(list(enumerate(losses, 1)))
    assert not result["ok"]
    assert "did not decrease" in result["error"]
    assert f"{loss_trend(losses)[0]:.4f}" in result["error"]  # the numbers are in the message


def test_nan_loss_fails_with_its_step():
    losses = decreasing(20)
    losses[7] = float("nan")
    result = check_loss([(i * 5, v) for i, v in enumerate(losses, 1)])
    assert not result["ok"]
    assert "nan at step 40" in result["error"]
    assert "learning_rate" in result["error"]


def test_one_point_is_no_trend():
    result = check_loss([(5, 1.0)])
    assert not result["ok"] and "logging_steps" in result["error"]


def test_no_loss_at_all():
    assert not check_loss([])["ok"]


def test_read_trainer_log_keeps_nan_skips_torn_line_and_dedupes_resumed_steps(tmp_path):
    path = trainer_log(tmp_path / "trainer_log.jsonl", [3.0, 2.5, float("nan")], total=6)
    with open(path, "a") as handle:  # a resumed run appends from its checkpoint; a crash tears a line
        handle.write(json.dumps({"current_steps": 4, "total_steps": 6, "loss": 2.0}) + "\n")
        handle.write('{"current_steps": 6, "total_st')
    entries = read_trainer_log(path)
    points = loss_points(entries)
    assert [s for s, _ in points] == [2, 4, 6]
    assert points[1] == (4, 2.0)  # the resumed value wins
    assert math.isnan(points[2][1])


# ----------------------------------------------------------------------------- completion


def test_completed_run(tmp_path):
    entries = read_trainer_log(trainer_log(tmp_path / "t.jsonl", decreasing(10), total=20))
    result = check_completed(entries, {"global_step": 20, "max_steps": 20})
    assert result["ok"] and result["current_steps"] == 20


def test_incomplete_steps_fail(tmp_path):
    entries = read_trainer_log(trainer_log(tmp_path / "t.jsonl", decreasing(10), total=100, final=False))
    result = check_completed(entries, None)
    assert not result["ok"]
    assert "step 20 of 100" in result["error"] and "resources.time" in result["error"]


def test_trainer_state_disagreeing_fails(tmp_path):
    entries = read_trainer_log(trainer_log(tmp_path / "t.jsonl", decreasing(10), total=20))
    result = check_completed(entries, {"global_step": 12, "max_steps": 20})
    assert not result["ok"] and "trainer_state.json" in result["error"]


# ----------------------------------------------------------------------------- GPU memory


def test_memory_stable_passes_and_ignores_idle_head_and_tail():
    samples = [gpu_sample(t, [0, 0]) for t in range(5)]  # before the model is on the GPUs
    samples += [gpu_sample(5 + t, [60000 + (t % 3) * 500, 61000]) for t in range(40)]
    samples += [gpu_sample(50 + t, [3, 3]) for t in range(3)]  # after the process exits
    result = check_memory_stable(samples)
    assert result["ok"] and not result["skipped"]
    assert set(result["gpus"]) == {"0", "1"}
    assert all(g["stable"] for g in result["gpus"].values())


def test_memory_growing_fails_with_numbers():
    samples = [gpu_sample(t, [40000 + 600 * t]) for t in range(40)]
    result = check_memory_stable(samples)
    assert not result["ok"]
    assert "GPU 0" in result["error"] and "MiB" in result["error"]
    assert result["gpus"]["0"]["growth"] > 0.1


def test_memory_within_tolerance_passes():
    samples = [gpu_sample(t, [50000 if t < 20 else 54000]) for t in range(40)]  # +8%
    assert check_memory_stable(samples)["ok"]
    assert not check_memory_stable(samples, tolerance=0.05)["ok"]


def test_memory_without_gpu_samples_is_skipped():
    samples = [{"time": t, "gpus": [], "rss_mb": 500, "ckpt_bytes": 0} for t in range(10)]
    result = check_memory_stable(samples)
    assert result["ok"] and result["skipped"] and "no GPU samples" in result["note"]


def test_monitor_files_pick_the_train_step(tmp_path):
    mon = tmp_path / "monitor"
    mon.mkdir()
    for name in ("dry_run.jsonl", "train.jsonl", "train-node1.jsonl", "trainer.jsonl"):
        (mon / name).write_text("")
    assert [p.name for p in validate.monitor_files(tmp_path, "train")] == ["train-node1.jsonl", "train.jsonl"]
    assert [p.name for p in validate.monitor_files(tmp_path, "dry_run")] == ["dry_run.jsonl"]
    assert validate.monitor_files(tmp_path, "other") == []
    assert len(validate.monitor_files(tmp_path, "other", only_train_step=True)) == 4


# ----------------------------------------------------------------------------- hand-off pieces


def test_deviations_from_profile_overrides_and_plan():
    prof = load_profile("toy", ["train.cutoff_len=2048"])
    rendered = {**prof.train, "tokenized_path": "/x", "output_dir": "/o", "overwrite_output_dir": False,
                "save_steps": 99}
    dev = validate.deviations(prof.values, rendered, prof.overrides, validate.plan_stage(prof.chain, prof.name))
    assert dev["plan_stage"] == "toy"
    assert dev["overrides"] == ["train.cutoff_len=2048"]
    assert dev["rendered_yaml_vs_profile"] == [{"key": "save_steps", "yaml": 99, "profile": 50}]
    by_key = {d["key"]: d for d in dev["vs_plan"]}
    assert by_key["train.cutoff_len"] == {"key": "train.cutoff_len", "plan": 4096, "actual": 2048}
    assert "resume" in by_key["train.overwrite_output_dir"]["why"]
    assert "train.learning_rate" not in by_key  # 7.0e-6 as planned


def test_plan_stage_follows_extends():
    demo = load_profile("demo")
    assert validate.plan_stage(demo.chain, demo.name) == "toy"
    assert validate.plan_stage([], "prod") == "prod"
    assert validate.plan_stage(["/x/mine.yaml"], "mine") is None


def test_data_checksums_collects_every_sha(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"source": {"sha256": "aa", "size": 3},
                                "outputs": {"arpo_sft_54k": {"sha256": "bb", "rows": 10}, "arpo_sft_toy": {"sha256": "cc"}}}))
    assert validate.data_checksums(path) == {"source.sha256": "aa", "outputs.arpo_sft_54k.sha256": "bb",
                                             "outputs.arpo_sft_54k.rows": 10, "outputs.arpo_sft_toy.sha256": "cc"}
    assert validate.data_checksums(tmp_path / "missing.json") == {}


# ----------------------------------------------------------------------------- the step, failing fast


def test_run_lists_every_failure_and_writes_the_report(tmp_path):
    pytest.importorskip("matplotlib")
    run_dir = render_run(tmp_path)
    ctx = StepContext.load(run_dir, "validate")
    out = ctx.output_dir()
    trainer_log(out / "trainer_log.jsonl", [2.0, 2.1, 2.2, 2.3], total=50, final=False)
    (run_dir / "monitor").mkdir()
    (run_dir / "monitor" / "train.jsonl").write_text(
        "".join(json.dumps(gpu_sample(t, [30000 + 900 * t])) + "\n" for t in range(30)))
    with pytest.raises(SftjobsError) as err:
        validate.run(ctx)
    text = str(err.value)
    for part in ("completed: training stopped at step 8 of 50", "loss: loss did not decrease",
                 "memory: train.jsonl: GPU memory is not stable", "checkpoints: no final model"):
        assert part in text, text
    report = json.loads(ctx.report_path().read_text())
    assert report["ok"] is False and len(report["failures"]) == 4
    assert Path(report["loss_curve"]).is_file()  # the curve is drawn even for a failing run
    assert not (run_dir / "handoff.json").exists()


def test_run_without_any_log(tmp_path):
    run_dir = render_run(tmp_path, dry_run_first=True)
    ctx = StepContext.load(run_dir, "validate_dry_run")
    with pytest.raises(SftjobsError) as err:
        validate.run(ctx)
    assert "trainer_log.jsonl does not exist" in str(err.value)
    assert str(ctx.output_dir("dry_run")) in str(err.value)  # names the dry run's own output dir


# ----------------------------------------------------------------------------- a real tiny model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from sftjobs.io.demo_assets import make_demo_model, make_synthetic_arpo

    base = tmp_path_factory.mktemp("tiny")
    data = make_synthetic_arpo(base / "corpus.jsonl", 60)
    return make_demo_model(base / "model", data, log=lambda *_: None)


def _demo_run_with_data(tmp_path: Path) -> tuple[Path, StepContext]:
    from sftjobs.io.demo_assets import make_synthetic_arpo

    run_dir = render_run(tmp_path)
    ctx = StepContext.load(run_dir, "validate")
    make_synthetic_arpo(Path(ctx.paths["data_dir"]) / "arpo_sft_toy.jsonl", 20, seed=1)
    make_synthetic_arpo(Path(ctx.paths["data_dir"]) / "arpo_sft_54k.jsonl", 30, seed=1)
    return run_dir, ctx


@pytest.mark.train
def test_run_passes_loads_generates_and_hands_off(tmp_path, tiny_model):
    run_dir, ctx = _demo_run_with_data(tmp_path)
    out = ctx.output_dir()
    shutil.copytree(tiny_model, out)  # the "final model" in output_dir
    shutil.copytree(tiny_model, out / "checkpoint-50")
    trainer_log(out / "trainer_log.jsonl", decreasing(25), total=50)
    (run_dir / "reports").mkdir(exist_ok=True)
    (run_dir / "reports" / "data.json").write_text(json.dumps({"outputs": {"arpo_sft_toy": {"sha256": "ab" * 32, "rows": 20}}}))
    (run_dir / "monitor").mkdir()
    (run_dir / "monitor" / "train.jsonl").write_text(
        "".join(json.dumps({"time": t, "gpus": [], "rss_mb": 800, "ckpt_bytes": 0}) + "\n" for t in range(5)))
    report = validate.run(ctx)
    assert report["ok"]
    assert report["checks"]["memory"]["skipped"]
    gen = report["generation"]
    assert len(gen["samples"]) == 3
    assert gen["prompts_from"].endswith("arpo_sft_toy.jsonl")
    assert all(s["new_tokens"] >= 1 and s["formatted_with"] == "chat_template" for s in gen["samples"])
    assert "What is" in gen["samples"][0]["prompt"]
    png = run_dir / "reports" / "validate_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    handoff = json.loads((run_dir / "handoff.json").read_text())
    assert handoff["final_checkpoint"] == str(out)
    assert handoff["checkpoints"] == [str(out / "checkpoint-50")]
    assert handoff["profile"] == "demo" and handoff["config_hash"] == ctx.config_hash
    assert handoff["data_checksums"] == {"outputs.arpo_sft_toy.sha256": "ab" * 32, "outputs.arpo_sft_toy.rows": 20}
    assert handoff["versions"]["transformers"]
    assert handoff["deviations"]["plan_stage"] == "toy"
    assert {"key": "deepspeed", "plan": "z2", "actual": "none"} in handoff["deviations"]["vs_plan"]
    assert json.loads(ctx.report_path().read_text())["handoff"] == str(run_dir / "handoff.json")


@pytest.mark.train
def test_dry_run_validation_writes_no_handoff(tmp_path, tiny_model):
    from sftjobs.io.demo_assets import make_synthetic_arpo

    run_dir = render_run(tmp_path, dry_run_first=True)
    ctx = StepContext.load(run_dir, "validate_dry_run")
    make_synthetic_arpo(Path(ctx.paths["data_dir"]) / "arpo_sft_toy.jsonl", 5)
    out = ctx.output_dir()
    assert out.name.endswith("-dry-run")
    (out).mkdir(parents=True)
    shutil.copytree(tiny_model, out / "checkpoint-8")  # only a checkpoint, no final export
    trainer_log(out / "trainer_log.jsonl", decreasing(8), total=16)
    report = validate.run(ctx)
    assert report["checks"]["checkpoints"]["loaded"] == str(out / "checkpoint-8")
    assert (run_dir / "reports" / "validate_dry_run_loss.png").is_file()
    assert not (run_dir / "handoff.json").exists()


@pytest.mark.train
def test_truncated_weights_fail_to_load(tmp_path, tiny_model):
    run_dir, ctx = _demo_run_with_data(tmp_path)
    out = ctx.output_dir()
    shutil.copytree(tiny_model, out)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    trainer_log(out / "trainer_log.jsonl", decreasing(25), total=50)
    with pytest.raises(SftjobsError) as err:
        validate.run(ctx)
    assert "does not load with transformers" in str(err.value)
    assert not (run_dir / "handoff.json").exists()


def test_memory_is_judged_on_allocated_memory_when_the_trainer_logged_it(tmp_path):
    """nvidia-smi grows when the caching allocator keeps blocks for the longest samples; the memory allocated
    between steps (what lf_train logs per process) is what a leak would move."""
    from sftjobs.steps.validate import allocator_files, estimate_vs_measured, memory_check

    def write(path, used):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"time": i, "gpus": [{"index": 0, "mem_used_mib": u, "peak_alloc_mib": u + 9000}]})
                                + "\n" for i, u in enumerate(used)))

    smi = tmp_path / "monitor" / "dry_run-node1.jsonl"
    write(smi, [40000, 60000, 64000, 66000, 80000, 82000])  # the allocator's cache growing
    steady = tmp_path / "monitor" / "allocator" / "dry_run-node1-rank0.jsonl"
    write(steady, [30000, 30010, 30005, 30012, 30008, 30011])
    assert allocator_files(tmp_path, "dry_run") == [steady] and allocator_files(tmp_path, "train") == []
    only_smi = memory_check([smi], [])
    assert not only_smi["ok"] and only_smi["basis"] == "nvidia-smi memory.used"
    judged = memory_check([smi], [steady])
    assert judged["ok"] and "allocated" in judged["basis"] and "not a leak" in judged["note"]
    assert judged["peak_allocated_mib"] == 39012 and not judged["nvidia_smi"]["ok"]
    leaking = tmp_path / "monitor" / "allocator" / "dry_run-node1-rank1.jsonl"
    write(leaking, [30000, 31000, 33000, 36000, 40000, 45000])
    assert not memory_check([smi], [steady, leaking])["ok"]
    plan = {"stage": "z1", "recompute": False, "candidates": [{"stage": "z1", "recompute": False, "allocated_gib": 64.1}]}
    assert estimate_vs_measured(plan, 39012) == {"memory_plan_allocated_gib": 64.1, "measured_peak_allocated_gib": 38.1}
    assert estimate_vs_measured(None, 39012) == {}

"""Which checkpoint a restarted training step resumes from: the newest complete one; a checkpoint that was
being written when the job died is moved aside (never deleted, never picked up)."""

import json
from pathlib import Path

import pytest

from sftjobs.steps.train import newest_complete_checkpoint, training_command


def make_checkpoint(output: Path, step: int, complete: bool) -> Path:
    path = output / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"w" * 10)
    if complete:  # HF Trainer writes trainer_state.json last
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_newest_complete_checkpoint_skips_one_interrupted_mid_save(tmp_path):
    out = tmp_path / "ck"
    make_checkpoint(out, 50, True)
    make_checkpoint(out, 100, True)
    make_checkpoint(out, 150, False)  # the job died while this was being saved
    (out / "checkpoint-notanumber").mkdir()
    chosen = newest_complete_checkpoint(out, log=lambda *_: None)
    assert chosen == out / "checkpoint-100"
    assert not (out / "checkpoint-150").exists()
    aside = [p.name for p in out.iterdir() if p.name.startswith("incomplete-checkpoint-150")]
    assert len(aside) == 1 and (out / aside[0] / "model.safetensors").exists()  # kept, just out of the way
    assert training_command(Path("/r/train.yaml"), chosen, env={})[-1] == f"resume_from_checkpoint={chosen}"


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert newest_complete_checkpoint(tmp_path / "missing", log=lambda *_: None) is None
    out = tmp_path / "ck"
    make_checkpoint(out, 10, False)
    assert newest_complete_checkpoint(out, log=lambda *_: None) is None
    assert not any(a.startswith("resume_from_checkpoint") for a in training_command(Path("/r/t.yaml"), None, env={}))


def test_training_command_single_process_and_torchrun():
    single = training_command(Path("/r/t.yaml"), None, env={}, python="/py")
    assert single == ["/py", "-m", "sftjobs.trainer.entry", "/r/t.yaml"]
    env = {"FORCE_TORCHRUN": "1", "NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "8",
           "MASTER_ADDR": "node-a", "MASTER_PORT": "21234"}
    dist = training_command(Path("/r/t.yaml"), Path("/ck/checkpoint-7"), {"balance_ranks": True},
                            Path("/run/monitor/allocator/train-h"), env=env, python="/py")
    assert dist[:3] == ["/py", "-m", "torch.distributed.run"]
    flags = dict(zip(dist[3:13:2], dist[4:13:2], strict=True))
    assert flags == {"--nnodes": "2", "--node_rank": "1", "--nproc_per_node": "8", "--master_addr": "node-a",
                     "--master_port": "21234"}
    assert dist[13:] == ["-m", "sftjobs.trainer.entry", "--balance-ranks", "--memory-log",
                         "/run/monitor/allocator/train-h", "/r/t.yaml", "resume_from_checkpoint=/ck/checkpoint-7"]
    packed = training_command(Path("/r/t.yaml"), None, {"balance_ranks": True, "pack_rank_samples": True}, env={})
    assert packed[1:5] == ["-m", "sftjobs.trainer.entry", "--balance-ranks", "--pack-rank-samples"]
    skipping = training_command(Path("/r/t.yaml"), None, {"pack_rank_samples": True, "skip_idle_micro_steps": True},
                                env={})
    assert skipping[1:5] == ["-m", "sftjobs.trainer.entry", "--pack-rank-samples", "--skip-idle-micro-steps"]
    splitting = training_command(Path("/r/t.yaml"), None, {"pack_rank_samples": True, "split_long_samples": True},
                                 env={})
    assert splitting[1:5] == ["-m", "sftjobs.trainer.entry", "--pack-rank-samples", "--split-long-samples"]
    cudnn = training_command(Path("/r/t.yaml"), None, {"per_sample_attention": True, "cudnn_attention_bucket": 256},
                             env={})
    assert cudnn[1:6] == ["-m", "sftjobs.trainer.entry", "--per-sample-attention", "--cudnn-attention-bucket", "256"]
    chunks = training_command(Path("/r/t.yaml"), None, {"liger_chunk_mem_const": 8}, env={})
    assert chunks[1:6] == ["-m", "sftjobs.trainer.entry", "--liger-chunk-mem-const", "8", "/r/t.yaml"]
    timed = training_command(Path("/r/t.yaml"), None, {"balance_ranks": True}, env={},
                             callbacks=("bench.step_timer:callbacks",))
    assert timed[1:] == ["-m", "sftjobs.trainer.entry", "--balance-ranks", "--callback", "bench.step_timer:callbacks",
                         "/r/t.yaml"]
    # more than one process per node means torchrun even without FORCE_TORCHRUN, as llamafactory-cli decides
    assert "torch.distributed.run" in training_command(Path("/r/t.yaml"), None, env={"NPROC_PER_NODE": "2"})


def test_launch_env_keeps_llamafactory_cli_defaults_and_user_choices():
    from sftjobs.steps.train import launch_env

    assert launch_env({})["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert launch_env({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"})["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    assert "TORCH_NCCL_AVOID_RECORD_STREAMS" not in launch_env({"OPTIM_TORCH": "0"})


def test_time_limit_requeues_follow_the_profile(tmp_path, in_tmp):
    """submitit requeues a step that reaches its time limit at most max_num_timeout times (its default: 3)."""
    pytest.importorskip("submitit")
    from sftjobs.executors.slurm import SlurmExecutor
    from sftjobs.planning.dag import build_plan
    from sftjobs.profile import load_profile

    for sets, expected in (([], 10), (["resources.max_time_requeues=25"], 25)):
        plan = build_plan(load_profile("prod", sets))
        train = plan.step("train")
        assert train.resources.max_time_requeues == expected
        backend = SlurmExecutor(need_sbatch=False)
        backend._limits = {}  # no partition limits to ask slurmctld for
        assert backend._executor(tmp_path, train, []).max_num_timeout == expected


def test_the_entry_takes_callback_factories_by_module_and_function(tmp_path, monkeypatch):
    """--callback MODULE:FUNCTION (the benchmark's hook): a callback or a list of them, in the order given."""
    import pytest

    from sftjobs.trainer.entry import load_callbacks, parse_args

    (tmp_path / "timer_factories.py").write_text("class Timer:\n    pass\n"
                                                 "def one():\n    return Timer()\n"
                                                 "def two():\n    return [Timer(), Timer()]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    opts = parse_args(["--callback", "timer_factories:one", "--callback", "timer_factories:two", "t.yaml", "a=1"])
    assert opts.callback == ["timer_factories:one", "timer_factories:two"] and opts.overrides == ["a=1"]
    made = load_callbacks(opts.callback)
    assert [type(c).__name__ for c in made] == ["Timer"] * 3
    assert parse_args(["t.yaml"]).callback == [] and load_callbacks([]) == []
    with pytest.raises(SystemExit, match="MODULE:FUNCTION"):
        load_callbacks(["timer_factories"])


def test_every_speed_switch_of_the_profile_reaches_the_entry_as_its_flag():
    from sftjobs.profile import SCHEMA
    from sftjobs.trainer.entry import SPEED_SWITCHES, parse_args

    # every bool speed.* key is either an entry switch, a rendered DeepSpeed setting (zero1_gradients_in_place) or
    # the memory plan's schedule passed as its value (recompute_by_length: tests/test_recompute_by_length.py)
    bool_keys = {name.removeprefix("speed.") for name, key in SCHEMA.items()
                 if name.startswith("speed.") and key.type is bool}
    assert set(SPEED_SWITCHES) == bool_keys - {"zero1_gradients_in_place", "recompute_by_length"}

    def entry_options(speed):  # the train step's command, parsed by the entry from the arguments after its module
        command = training_command(Path("/r/t.yaml"), None, speed, env={}, python="/py")
        return vars(parse_args(command[command.index("sftjobs.trainer.entry") + 1:]))

    for key in SPEED_SWITCHES:
        opts = entry_options({key: True})
        assert [name for name in SPEED_SWITCHES if opts[name]] == [key]
        assert opts["config"] == "/r/t.yaml"
    none = entry_options({})
    assert not any(none[name] for name in SPEED_SWITCHES)

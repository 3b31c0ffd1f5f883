"""The patch registry (sftjobs/trainer/patches.py): on a version outside the verified list each speed feature turns
itself off with one line (feature, why, cost) and the run goes on stock; a patch target that no longer exists is caught
by the check, not by an AttributeError mid-run; pre-flight refuses the known-bad combinations with the fix.

Versions are simulated by replacing patches.installed_version (the one version lookup); nothing is installed."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from sftjobs.steps import preflight
from sftjobs.trainer import patches

SPEED = ["speed.balance_ranks", "speed.per_sample_attention", "speed.pack_rank_samples",
         "speed.skip_idle_micro_steps", "speed.split_long_samples", "speed.cudnn_attention_bucket"]
ALL_TRAINING = ["unpadded_single_rows", *SPEED]


def simulate(monkeypatch, **versions):
    """installed_version answers ``versions`` (package -> version, None: not installed) and the real one otherwise."""
    real = patches.installed_version

    def fake(package):
        return versions[package] if package in versions else real(package)

    monkeypatch.setattr(patches, "installed_version", fake)


def no_imports(monkeypatch):
    def fail(target):
        raise AssertionError(f"{target} resolved although its versions are not verified")

    monkeypatch.setattr(patches, "missing_target", fail)


def test_an_unverified_transformers_turns_every_speed_feature_off_with_its_reason(monkeypatch):
    simulate(monkeypatch, transformers="5.7.0")
    no_imports(monkeypatch)  # an unverified environment is decided without importing anything
    lines = []
    decisions = patches.decide(ALL_TRAINING, log=lines.append)
    assert [name for name, d in decisions.items() if d.on] == []
    assert len(lines) == len(ALL_TRAINING)  # one line per feature
    for name, line in zip(ALL_TRAINING, lines, strict=True):
        assert line.startswith(f"{name} off: transformers 5.7.0 not verified (verified: ==4.56.2, ==5.5.4, ==5.6.0)")
        assert "runs stock, " in line and patches.FEATURES[name].cost in line
    assert "13,460 vs 10,370 tok/s/GPU" in lines[ALL_TRAINING.index("speed.skip_idle_micro_steps")]


@pytest.mark.parametrize("package,version,features", [
    ("llamafactory", "0.9.6", ALL_TRAINING),  # cuDNN's own patch is torch's, but it runs in per-sample attention
    ("deepspeed", "0.20.0", ["speed.skip_idle_micro_steps", "speed.split_long_samples"]),
    ("accelerate", "1.12.0", ["speed.balance_ranks", "speed.pack_rank_samples", "speed.skip_idle_micro_steps",
                              "speed.split_long_samples"]),
    ("torch", "2.12.0", ["speed.balance_ranks", "speed.per_sample_attention", "speed.pack_rank_samples",
                         "speed.skip_idle_micro_steps", "speed.split_long_samples", "speed.cudnn_attention_bucket"]),
])
def test_each_package_turns_off_what_reaches_into_it(monkeypatch, package, version, features):
    simulate(monkeypatch, **{package: version})
    monkeypatch.setattr(patches, "missing_target", lambda target: None)  # this test is about versions
    decisions = patches.decide(ALL_TRAINING)
    off = [name for name, d in decisions.items() if not d.on]
    assert off == features
    for name in off:
        why = decisions[name].why
        assert f"{package} {version} not verified" in why or "needs speed.pack_rank_samples, which is off" in why


def test_a_cuda_local_label_is_the_verified_torch(monkeypatch):
    simulate(monkeypatch, torch="2.11.0+cu130")
    monkeypatch.setattr(patches, "missing_target", lambda target: None)
    assert all(d.on for d in patches.decide(ALL_TRAINING).values())


def test_lf_train_options_follow_the_decisions(monkeypatch):
    from sftjobs.trainer import entry as lf_train

    simulate(monkeypatch, deepspeed="0.20.0")
    monkeypatch.setattr(patches, "missing_target", lambda target: None)
    opts = lf_train.parse_args(["--balance-ranks", "--pack-rank-samples", "--skip-idle-micro-steps",
                                "--split-long-samples", "--per-sample-attention", "--cudnn-attention-bucket", "256",
                                "train.yaml"])
    decisions = patches.decide(patches.speed_features(vars(opts)))
    patches.switch_off(opts, decisions)
    assert (opts.balance_ranks, opts.pack_rank_samples, opts.per_sample_attention, opts.cudnn_attention_bucket) == \
        (True, True, True, 256)
    assert (opts.skip_idle_micro_steps, opts.split_long_samples) == (False, False)  # they rely on DeepSpeed 0.19.8
    assert opts.config == "train.yaml"


def test_the_maintainers_switch_keeps_unverified_features_on_and_says_so(monkeypatch):
    simulate(monkeypatch, transformers="5.7.0")
    monkeypatch.setenv(patches.UNVERIFIED_ENV, "1")
    monkeypatch.setattr(patches, "missing_target", lambda target: None)
    lines = []
    decisions = patches.decide(["speed.balance_ranks"], log=lines.append)
    assert decisions["speed.balance_ranks"].on
    assert lines == ["speed.balance_ranks on (transformers 5.7.0 not verified (verified: ==4.56.2, ==5.5.4, ==5.6.0) "
                     f"(runs anyway: {patches.UNVERIFIED_ENV}))"]


def test_a_missing_target_is_caught_by_the_check(monkeypatch):
    sampler = next(p for p in patches.PATCHES if p.name == "trainer_sampler")
    gone = dataclasses.replace(sampler, targets=("json:JSONDecoder.no_such_method",), verified={})
    unimportable = dataclasses.replace(sampler, name="other", serves=("speed.per_sample_attention",), verified={},
                                       targets=("sftjobs_no_such_module:anything",))
    monkeypatch.setattr(patches, "PATCHES", (gone, unimportable))
    lines = []
    decisions = patches.decide(["speed.balance_ranks", "speed.per_sample_attention"], log=lines.append)
    assert lines[0].startswith("speed.balance_ranks off: patch trainer_sampler: json:JSONDecoder.no_such_method does "
                               "not exist (json.JSONDecoder has no no_such_method); runs stock")
    assert not decisions["speed.per_sample_attention"].on
    assert "sftjobs_no_such_module does not import (ModuleNotFoundError" in decisions["speed.per_sample_attention"].why
    assert "sftjobs_no_such_module" not in sys.modules


def test_target_resolution_calls_nothing():
    assert patches.missing_target("json:JSONDecoder.decode") is None
    assert patches.missing_target("json:JSONDecoder.decode.nope") == \
        "json:JSONDecoder.decode.nope does not exist (json.JSONDecoder.decode has no nope)"


def test_every_registered_target_names_a_module_and_an_attribute():
    names = [p.name for p in patches.PATCHES]
    assert len(names) == len(set(names))
    for patch in patches.PATCHES:
        assert patch.serves and patch.install and patch.undo and patch.verified
        assert set(patch.serves) <= set(patches.FEATURES)
        assert set(patch.replaces) <= set(patch.targets)
        for target in patch.targets:
            module, _, path = target.partition(":")
            assert module and path, target
    served = {name for p in patches.PATCHES for name in p.serves}
    assert served == set(patches.FEATURES)  # every feature has its patches listed


# ----------------------------------------------------------------------------- known-bad combinations


def test_fa2_with_transformers_560_is_refused_with_the_fix():
    versions = {"transformers": "5.6.0", "flash_attn": "2.8.3", "deepspeed": None}
    result = preflight.check_known_bad(versions, {"flash_attn": "fa2"}, {}, "none")
    assert not result["ok"]
    assert "transformers 5.6.0" in result["error"] and "LLaMA-Factory issue #10610" in result["error"]
    assert "pip install 'transformers==5.5.4'" in result["error"] and "train.flash_attn: sdpa" in result["error"]


@pytest.mark.parametrize("versions,cfg,speed", [
    ({"transformers": "5.5.4", "flash_attn": "2.8.3"}, {"flash_attn": "fa2"}, {}),  # the pin
    ({"transformers": "5.6.0", "flash_attn": None}, {"flash_attn": "fa2"}, {}),  # no flash-attn: LF takes SDPA
    ({"transformers": "5.6.0", "flash_attn": "2.8.3"}, {"flash_attn": "sdpa"}, {}),
    ({"transformers": "5.6.0", "flash_attn": "2.8.3"}, {}, {}),  # auto: transformers picks SDPA
    ({"transformers": "5.6.0", "flash_attn": "2.8.3"}, {"flash_attn": "fa2"}, {"pack_rank_samples": True}),
])
def test_what_is_not_the_known_bad_combination_passes(versions, cfg, speed):
    result = preflight.check_known_bad(versions, cfg, speed, "none")
    assert result["ok"], result["summary"]


def fake_probe(**found):
    return lambda: {"op": "cpu_adam", "installed": False, "compatible": True, "ninja": True, "cxx": "/usr/bin/c++",
                    "torch_cuda": "13.0", **found}


def test_an_offload_stage_whose_op_deepspeed_cannot_build_is_refused():
    mismatch = ("DeepSpeed Op Builder: Installed CUDA version 13.1 does not match the version torch was compiled "
                "with 13.0, unable to compile cuda/cpp extensions without a matching cuda version.")
    versions = {"transformers": "5.5.4", "deepspeed": "0.19.8"}
    result = preflight.check_known_bad(versions, {}, {}, "z3_offload", probe=fake_probe(cuda_mismatch=mismatch))
    assert not result["ok"]
    assert "deepspeed: z3_offload JIT-builds cpu_adam" in result["error"] and "13.1" in result["error"]
    assert "DS_SKIP_CUDA_CHECK=1" in result["error"]
    result = preflight.check_known_bad(versions, {}, {}, "z2_offload", probe=fake_probe(ninja=False, cxx=None))
    assert "pip install ninja" in result["error"] and "no C++ compiler" in result["error"]
    assert preflight.check_known_bad(versions, {}, {}, "z3_offload", probe=fake_probe(installed=True))["ok"]
    assert preflight.check_known_bad(versions, {}, {}, "z3", probe=fake_probe(compatible=False))["ok"]  # builds none


def test_the_node_environment_is_reported_next_to_the_submit_one():
    current = {"torch": "2.9.1", "transformers": "5.5.4", "deepspeed": "0.19.8", "llamafactory": "0.9.5",
               "accelerate": "1.11.0", "flash_attn": None, "python": "3.11.7"}
    result = preflight.check_versions(current, {**current, "accelerate": "1.10.0", "flash_attn": "2.8.3"}, "z2")
    assert result["ok"]  # accelerate and flash_attn are not strict
    assert "accelerate 1.11.0 (submit: 1.10.0)" in result["summary"]
    assert "flash_attn None (submit: 2.8.3)" in result["summary"]
    assert "transformers 5.5.4," in result["summary"]  # equal: no note


# ----------------------------------------------------------------------------- train tier: the real targets


@pytest.mark.train
def test_every_target_exists_on_the_installed_versions():
    for patch in patches.PATCHES:
        assert patches.check_patch(patch)["targets"] == [], patch.name


@pytest.mark.train
def test_a_vanished_trainer_method_turns_the_feature_off_instead_of_an_attribute_error(monkeypatch):
    import transformers
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

    from sftjobs.trainer import entry as lf_train

    monkeypatch.delattr(CustomSeq2SeqTrainer, "_get_train_sampler")
    monkeypatch.delattr(transformers.Trainer, "_get_train_sampler")
    with pytest.raises(AttributeError):  # what installing it unchecked would do mid-run
        lf_train.install_balanced_sampler()
    lines = []
    opts = lf_train.parse_args(["--balance-ranks", "train.yaml"])
    patches.switch_off(opts, patches.decide(patches.speed_features(vars(opts)), log=lines.append))
    assert opts.balance_ranks is False
    assert lines == ["speed.balance_ranks off: patch trainer_sampler: llamafactory.train.sft.trainer:"
                     "CustomSeq2SeqTrainer._get_train_sampler does not exist (trainer.CustomSeq2SeqTrainer has no "
                     f"_get_train_sampler); runs stock, {patches.FEATURES['speed.balance_ranks'].cost}"]


@pytest.mark.train
def test_lf_train_logs_the_features_it_turns_off_and_trains_stock(monkeypatch, capsys, tmp_path):
    import llamafactory.train.tuner as tuner
    from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask as Collator
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

    from sftjobs.trainer import entry as lf_train

    saved = patches.save()
    before = (CustomSeq2SeqTrainer._get_train_sampler, CustomSeq2SeqTrainer.training_step, Collator.__call__)
    ran = []
    monkeypatch.setattr(tuner, "run_exp", lambda callbacks: ran.append(sys.argv[1:]))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() hands LLaMA-Factory its arguments through sys.argv
    simulate(monkeypatch, transformers="5.7.0")
    try:
        lf_train.main(["--balance-ranks", "--pack-rank-samples", "--skip-idle-micro-steps", "--split-long-samples",
                       str(tmp_path / "train.yaml")])
        after = (CustomSeq2SeqTrainer._get_train_sampler, CustomSeq2SeqTrainer.training_step, Collator.__call__)
    finally:
        patches.restore(saved)
    assert ran == [[str(tmp_path / "train.yaml")]]  # LLaMA-Factory's run_exp ran
    assert after == before  # nothing was patched: stock
    err = capsys.readouterr().err
    for name in ("unpadded_single_rows", "speed.balance_ranks", "speed.pack_rank_samples",
                 "speed.skip_idle_micro_steps", "speed.split_long_samples"):
        assert f"[sftjobs train] {name} off: transformers 5.7.0 not verified" in err, err


@pytest.mark.train
def test_save_and_restore_undo_every_install():
    from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask as Collator
    from llamafactory.train.sft import workflow
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

    from sftjobs.trainer import entry as lf_train
    from sftjobs.trainer.attention import per_sample as per_sample_attention

    def state():
        return (vars(CustomSeq2SeqTrainer).get("_get_train_sampler"), vars(CustomSeq2SeqTrainer).get("training_step"),
                vars(CustomSeq2SeqTrainer).get("get_train_dataloader"), Collator.__call__, Collator.__post_init__,
                workflow.load_model)

    before = state()
    saved = patches.save()
    lf_train.install_unpadded_single_rows()
    lf_train.install_pack_rank_samples(skip_idle=True, split=True)
    per_sample_attention.install(log=lambda _: None, always=True)
    changed = state()
    patches.restore(saved)
    assert all(a is not b for a, b in zip(before, changed, strict=True))
    assert state() == before
    assert "training_step" not in vars(CustomSeq2SeqTrainer) and "get_train_dataloader" not in vars(CustomSeq2SeqTrainer)


@pytest.mark.parametrize("feature", ["speed.lean_zero_step", "speed.fused_zero_update"])
@pytest.mark.parametrize("package,version", [("deepspeed", "0.20.0"), ("torch", "2.12.0")])
def test_the_zero_step_patches_turn_off_on_an_unverified_deepspeed_or_torch(monkeypatch, package, version, feature):
    simulate(monkeypatch, **{package: version})
    no_imports(monkeypatch)
    lines = []
    decision = patches.decide([feature], log=lines.append)[feature]
    assert not decision.on and lines == [decision.line()]
    assert lines[0].startswith(f"{feature} off: {package} {version} not verified")
    assert patches.FEATURES[feature].cost in lines[0]


@pytest.mark.parametrize("name, attributes", [("lean_zero_step", ("get_grad_norm_direct", "check_overflow")),
                                              ("fused_zero_update", ("step",))])
def test_the_zero_step_installs_are_undone_by_restore(name, attributes):
    import importlib

    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Zero

    before = tuple(getattr(Zero, a) for a in attributes)
    saved = patches.save([name])
    importlib.import_module(f"sftjobs.trainer.{name}").install(log=lambda _: None)
    assert tuple(getattr(Zero, a) for a in attributes) != before
    patches.restore(saved)
    assert tuple(getattr(Zero, a) for a in attributes) == before

"""Every profile mistake: one clear message naming the file and key, exit code 2, no traceback, nothing written."""

import textwrap

import pytest

from sftjobs.cli import main
from sftjobs.profile import load_profile
from tests.conftest import run_cli

CASES = [
    # (id, profile text, --set overrides, words the message must contain)
    ("unknown-top-key", "extends: toy\noutptu_dir: /x\n", [], ["outptu_dir", "did you mean 'output_dir'"]),
    ("unknown-train-key", "extends: toy\ntrain:\n  cuttoff_len: 10\n", [], ["train.cuttoff_len", "did you mean 'cutoff_len'"]),
    ("unknown-section-key", "extends: toy\nresources:\n  gpus_per_nod: 2\n", [],
     ["resources.gpus_per_nod", "resources.gpus_per_node"]),
    ("wrong-type", "extends: toy\nresources:\n  nodes: two\n", [], ["resources.nodes", "must be an integer"]),
    ("bool-is-not-int", "extends: toy\nresources:\n  nodes: true\n", [], ["resources.nodes", "must be an integer"]),
    ("batch-zero", "extends: toy\ntrain:\n  per_device_train_batch_size: 0\n", [],
     ["train.per_device_train_batch_size", ">= 1"]),
    ("cutoff-zero", "extends: toy\n", ["train.cutoff_len=0"], ["train.cutoff_len", ">= 1"]),
    ("negative-lr", "extends: toy\n", ["train.learning_rate=-1e-5"], ["train.learning_rate", "> 0"]),
    ("deepspeed-no-gpu", "extends: toy\nresources:\n  gpus_per_node: 0\ntrain:\n  bf16: false\n", [],
     ["deepspeed: z2", "gpus_per_node is 0"]),
    ("too-many-gpus", "extends: toy\n", ["resources.gpus_per_node=9"], ["gpus_per_node is 9", "8 GPUs"]),
    ("multinode-local", "extends: prod\n", ["resources.nodes=2", "resources.executor=local"],
     ["nodes is 2", "local executor"]),
    ("bad-deepspeed", "extends: toy\ndeepspeed: z4\n", [], ["deepspeed", "z3_offload"]),
    ("bad-time", "extends: toy\nresources:\n  time: two hours\n", [], ["resources.time", "Slurm time"]),
    ("bad-mem", "extends: toy\nresources:\n  mem: lots\n", [], ["resources.mem", "64G"]),
    ("empty-file", "", [], ["is empty"]),
    ("not-a-mapping", "- a\n- b\n", [], ["must be a YAML mapping"]),
    ("broken-yaml", "extends: toy\ntrain:\n  cutoff_len: [1, 2\n", [], ["not valid YAML", "line"]),
    ("missing-parent", "extends: nosuchprofile\n", [], ["nosuchprofile", "cannot be found"]),
    ("managed-key", "extends: toy\ntrain:\n  output_dir: /x\n", [], ["train.output_dir", "output_dir (top level)"]),
    ("overwrite-output-dir", "extends: toy\ntrain:\n  overwrite_output_dir: true\n", [],
     ["overwrite_output_dir", "resume"]),
    ("hub-without-id", "extends: toy\nmodel:\n  hub_id: null\n", [], ["model.hub_id"]),
    ("path-without-path", "extends: toy\ndata:\n  source: path\n", [], ["data.path"]),
    ("bad-fraction", "extends: toy\ndata:\n  max_bad_fraction: 2\n", [], ["data.max_bad_fraction", "between 0 and 1"]),
    ("bf16-on-cpu", "extends: demo\n", ["train.bf16=true"], ["bf16", "gpus_per_node is 0"]),
    ("bad-set-syntax", "extends: toy\n", ["train.cutoff_len"], ["--set", "key=value"]),
    ("set-into-value", "extends: toy\n", ["output_dir.x=1"], ["output_dir", "not a section"]),
    ("section-as-value", "extends: toy\nmodel: qwen\n", [], ["'model'", "mapping"]),
    ("global-size-indivisible", "extends: prod\nbatch:\n  global_size: 16\nresources:\n  gpus_per_node: 3\n", [],
     ["batch.global_size 16", "3 GPU(s)", "per_device_train_batch_size 1", "15 (ga 5) or 18 (ga 6)"]),
    ("global-size-not-int", "extends: toy\nbatch:\n  global_size: lots\n", [], ["batch.global_size", "an integer or null"]),
    ("gpu-memory-zero", "extends: toy\nresources:\n  gpu_memory_gib: 0\n", [], ["resources.gpu_memory_gib", "> 0"]),
    ("deepspeed-auto-no-gpu", "extends: demo\ndeepspeed: auto\n", [], ["deepspeed: auto", "gpus_per_node is 0"]),
    ("deepspeed-auto-nothing-fits", "extends: prod\ndeepspeed: auto\nresources:\n  gpus_per_node: 1\n  gpu_memory_gib: 8\n",
     [], ["no layout that fits", "resources.gpu_memory_gib is 8", "more GPUs", "train.cutoff_len"]),
    ("deepspeed-auto-unknown-model", "extends: toy\ndeepspeed: auto\nmodel:\n  hub_id: someone/unknown-7b\n", [],
     ["model's shape", "someone/unknown-7b", "model.local_dir", "deepspeed"]),
    ("per-sample-attention-unpacked", "extends: toy\nspeed:\n  per_sample_attention: true\n", [],
     ["speed.per_sample_attention", "train.neat_packing"]),
    ("pack-rank-samples-with-packing", "extends: fast\nspeed:\n  pack_rank_samples: true\n", [],
     ["speed.pack_rank_samples", "train.packing", "false"]),
    ("pack-rank-samples-batch-2", "extends: prod\ntrain:\n  per_device_train_batch_size: 2\n", [],
     ["speed.pack_rank_samples", "per_device_train_batch_size: 1"]),
    ("skip-idle-without-packs", "extends: toy\nspeed:\n  skip_idle_micro_steps: true\n", [],
     ["speed.skip_idle_micro_steps", "speed.pack_rank_samples: true"]),
    ("split-without-packs", "extends: toy\nspeed:\n  split_long_samples: true\n", [],
     ["speed.split_long_samples", "speed.pack_rank_samples: true"]),
    ("cudnn-bucket-unpacked", "extends: toy\nspeed:\n  cudnn_attention_bucket: 256\n", [],
     ["speed.cudnn_attention_bucket", "speed.per_sample_attention", "speed.pack_rank_samples"]),
    ("cudnn-bucket-negative", "extends: fast\nspeed:\n  cudnn_attention_bucket: -1\n", [],
     ["speed.cudnn_attention_bucket"]),
    ("balance-ranks-not-bool", "extends: toy\nspeed:\n  balance_ranks: maybe\n", [], ["speed.balance_ranks", "true/false"]),
    ("missing-output-dir", "model:\n  hub_id: a/b\n  local_dir: ./m\ndata:\n  hub_repo: a/b\n  hub_file: f.jsonl\n", [],
     ["output_dir", "missing"]),
]


@pytest.mark.parametrize("case_id,text,overrides,words", CASES, ids=[c[0] for c in CASES])
def test_bad_profile_gives_one_clear_error(case_id, text, overrides, words, in_tmp, capsys):
    path = in_tmp / f"{case_id}.yaml"
    path.write_text(textwrap.dedent(text))
    args = ["render", str(path), "--out", str(in_tmp / "out")]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("sftjobs: error: ") and "Traceback" not in err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    if case_id not in ("bad-set-syntax", "set-into-value"):  # about the command line, not a file
        assert str(path) in err or "nosuchprofile" in err  # the message names the file
    assert not (in_tmp / "out").exists(), "nothing may be written for a bad profile"


def test_cycle_in_extends(in_tmp, capsys):
    (in_tmp / "a.yaml").write_text("extends: ./b.yaml\n")
    (in_tmp / "b.yaml").write_text("extends: ./a.yaml\n")
    assert main(["render", str(in_tmp / "a.yaml")]) == 2
    assert "loop" in capsys.readouterr().err


def test_unknown_profile_name_suggests(in_tmp, capsys):
    assert main(["render", "prdo"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'prod'" in err and "Known profiles" in err


def test_cli_subprocess_exit_code_and_no_traceback(in_tmp):
    (in_tmp / "bad.yaml").write_text("extends: toy\nresources:\n  nodes: 0\n")
    result = run_cli("render", str(in_tmp / "bad.yaml"), cwd=in_tmp)
    assert result.returncode == 2
    assert "resources.nodes" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_set_overrides_keep_types_and_extends_merges(in_tmp):
    profile = load_profile("prod", ["train.cutoff_len=2048", "resources.partition=gpu", "train.bf16=false",
                                    "resources.gpus_per_node=4"])
    assert profile.train["cutoff_len"] == 2048
    assert profile.train["bf16"] is False
    assert profile.get("resources.partition") == "gpu"
    # inherited from toy through extends, untouched by prod
    assert profile.train["template"] == "qwen" and profile.train["learning_rate"] == 7.0e-6
    assert profile.chain[0].endswith("prod.yaml") and profile.chain[1].endswith("toy.yaml")


def test_users_own_configs_dir_is_searched_first(in_tmp):
    (in_tmp / "configs").mkdir()
    (in_tmp / "configs" / "mine.yaml").write_text("extends: toy\noutput_dir: ./ck/mine\n")
    profile = load_profile("mine")
    assert profile.values["output_dir"] == "./ck/mine"


def test_profiles_command_lists_each_with_summary(in_tmp, capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    for name in ("toy", "prod", "demo"):
        assert any(line.startswith(name + " ") and "Stage" in line or "demo" in line for line in out.splitlines())

"""Every profile mistake: one clear message naming the file and key, exit code 2, no traceback, nothing written."""

import textwrap
from pathlib import Path

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
    ("liger-chunks-negative", "extends: prod\nspeed:\n  liger_chunk_mem_const: -1\n", [],
     ["speed.liger_chunk_mem_const"]),
    ("balance-ranks-not-bool", "extends: toy\nspeed:\n  balance_ranks: maybe\n", [], ["speed.balance_ranks", "true/false"]),
    ("missing-output-dir", "model:\n  hub_id: a/b\n  local_dir: ./m\ndata:\n  hub_repo: a/b\n  hub_file: f.jsonl\n", [],
     ["output_dir", "missing"]),
    # empty or blank paths (`--set output_dir=$UNSET`) would mean the current directory
    ("empty-output-dir", "extends: toy\n", ["output_dir="], ["'output_dir' is empty", "current directory"]),
    ("blank-output-dir", "extends: toy\noutput_dir: '   '\n", [], ["'output_dir' is empty"]),
    ("empty-data-dir", "extends: toy\n", ["data.dir="], ["'data.dir' is empty"]),
    ("empty-data-path", "extends: toy\n", ["data.source=path", "data.path="], ["'data.path' is empty"]),
    ("empty-model-local-dir", "extends: toy\n", ["model.local_dir= "], ["'model.local_dir' is empty"]),
    ("empty-model-path", "extends: toy\n", ["model.source=path", "model.path="], ["'model.path' is empty"]),
    ("empty-hub-file", "extends: toy\n", ["data.hub_file="], ["'data.hub_file' is empty"]),
    ("empty-launcher-python", "extends: toy\n", ["launcher.python="], ["'launcher.python' is empty"]),
    # characters no value can hold, and values bound for #SBATCH lines with a trailing line break ("$" in a
    # regex matches before it, so these once passed)
    ("nul-in-value", 'extends: toy\ndescription: "a\\0b"\n', [], ["'description'", "NUL"]),
    ("nul-in-train-value", 'extends: toy\ntrain:\n  run_name: "x\\0"\n', [], ["'train.run_name'", "NUL"]),
    ("partition-trailing-newline", "extends: toy\n", ["resources.partition=gpu\n"], ["resources.partition", "newlines"]),
    ("sbatch-extra-trailing-newline", 'extends: toy\nresources:\n  sbatch_extra: ["--comment=a\\n"]\n', [],
     ["resources.sbatch_extra", "newlines"]),
    ("mem-trailing-newline", 'extends: toy\nresources:\n  mem: "64G\\n"\n', [], ["resources.mem", "64G"]),
    ("time-trailing-newline", 'extends: toy\nresources:\n  time: "02:00:00\\n"\n', [], ["resources.time", "Slurm time"]),
    ("setup-line-with-newline", 'extends: toy\nlauncher:\n  setup: ["module load x\\ntouch PWNED"]\n', [],
     ["launcher.setup", "one shell line"]),
    ("setup-line-with-cr", 'extends: toy\nlauncher:\n  setup: ["module load x\\r"]\n', [], ["launcher.setup", "carriage return"]),
    ("setup-line-not-text", "extends: toy\nlauncher:\n  setup: [{a: b}]\n", [], ["launcher.setup", "strings"]),
    # mail: sbatch --mail-type / --mail-user (issue 18)
    ("mail-type-unknown", "extends: toy\nresources:\n  mail_type: END,FAILURE\n", [],
     ["resources.mail_type", "'FAILURE' is not one", "TIME_LIMIT_80"]),
    ("mail-type-lowercase", "extends: toy\n", ["resources.mail_type=end"], ["resources.mail_type", "'end'"]),
    ("mail-type-none-and-end", "extends: toy\n", ["resources.mail_type=NONE,END"], ["resources.mail_type", "NONE"]),
    ("mail-type-list", "extends: toy\nresources:\n  mail_type: [END]\n", [], ["resources.mail_type", "a string"]),
    ("mail-type-trailing-newline", 'extends: toy\nresources:\n  mail_type: "END\\n"\n', [],
     ["resources.mail_type"]),
    ("mail-user-shell", "extends: toy\n", ["resources.mail_user=a@b.org;touch PWNED"], ["resources.mail_user",
                                                                                       "shell characters"]),
    ("mail-user-subst", "extends: toy\n", ["resources.mail_user=$(id)@b.org"], ["resources.mail_user"]),
    ("mail-user-space", "extends: toy\n", ["resources.mail_user=alice smith@b.org"], ["resources.mail_user"]),
    ("mail-user-newline", 'extends: toy\nresources:\n  mail_user: "a@b.org\\nBcc: x@y.z"\n', [],
     ["resources.mail_user", "control characters"]),
    ("mail-user-two-at", "extends: toy\n", ["resources.mail_user=a@b@c.org"], ["resources.mail_user"]),
    ("mail-user-empty", "extends: toy\n", ["resources.mail_user="], ["resources.mail_user"]),
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


# The profile's file name becomes the run id, the run directory, the Slurm job name and comments in the rendered
# files: every character that could end a comment, a shell word, an #SBATCH line or a squeue field is refused.
UNSAFE_NAMES = [
    ("newline", "x\ny$(touch PWNED)"),
    ("carriage-return", "x\rtouch PWNED"),
    ("quotes", "a'b\"c"),
    ("command-substitution", "a$(touch PWNED)b"),
    ("backticks", "a`touch PWNED`b"),
    ("semicolon", "a;touch PWNED"),
    ("hash", "a#b"),
    ("yaml-syntax", "key: [value]"),
    ("jinja-expression", "{{ 7*7 }}"),
    ("jinja-statement", "{% raw %}x"),
    ("space", "my stage"),
    ("pipe", "a|b"),
    ("percent", "stage%j"),
    ("leading-dash", "-x"),
    ("leading-dot", ".hidden"),
    ("too-long", "x" * 101),
]


@pytest.mark.parametrize("name", [n for _, n in UNSAFE_NAMES], ids=[i for i, _ in UNSAFE_NAMES])
def test_unsafe_profile_file_name_is_refused_at_once(name, in_tmp, capsys):
    path = in_tmp / f"{name}.yaml"
    path.write_text("extends: toy\n")
    assert main(["render", str(path), "--out", str(in_tmp / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sftjobs: error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err  # the name is shown escaped, never as a line break
    assert repr(str(path)) in err and "[A-Za-z0-9._-]" in err and "not starting with '-' or '.'" in err
    assert not (in_tmp / "out").exists() and not list(in_tmp.rglob("PWNED*"))


def test_safe_profile_file_names_are_taken(in_tmp, capsys):
    for name in ("stage_2-qwen.v1", "_x", "A" * 100):
        (in_tmp / f"{name}.yaml").write_text("extends: toy\n")
        assert main(["render", str(in_tmp / f"{name}.yaml"), "--out", str(in_tmp / name)]) == 0
        assert f"run of {name}." in (in_tmp / name / "llamafactory" / "train.yaml").read_text()


def _latin1(text: str) -> bytes:
    return text.encode("latin-1")


# profile files that are not UTF-8 text: bytes, the words of the one message
NOT_UTF8 = [
    ("gzip", lambda t: __import__("gzip").compress(t.encode()), ["gzip-compressed", "gunzip -c"]),
    ("binary", lambda t: bytes(range(256)) * 4, ["binary", "NUL"]),
    ("latin-1", lambda t: _latin1(t + "description: caf\u00e9 cr\u00e8me\n"), ["not UTF-8 text", "line 2",
                                                                            "iconv -f LATIN1 -t UTF-8"]),
    ("utf-16-bom", lambda t: t.encode("utf-16"), ["UTF-16 (little-endian, with a byte-order mark)", "iconv -f UTF-16 "]),
    ("utf-16le", lambda t: t.encode("utf-16-le"), ["UTF-16 (little-endian, no byte-order mark)", "iconv -f UTF-16LE"]),
    ("utf-16be", lambda t: t.encode("utf-16-be"), ["UTF-16 (big-endian, no byte-order mark)", "iconv -f UTF-16BE"]),
    ("utf-32-bom", lambda t: t.encode("utf-32"), ["UTF-32 (little-endian, with a byte-order mark)", "iconv -f UTF-32 "]),
]


@pytest.mark.parametrize("case_id,encode,words", NOT_UTF8, ids=[c[0] for c in NOT_UTF8])
def test_profile_that_is_not_utf8_text(case_id, encode, words, in_tmp):
    path = in_tmp / f"{case_id}.yaml"
    path.write_bytes(encode("extends: toy\n"))
    result = run_cli("render", str(path), "--out", str(in_tmp / "out"), cwd=in_tmp)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in [str(path), *words]:
        assert word in result.stderr, f"{word!r} not in {result.stderr!r}"
    assert not (in_tmp / "out").exists()


def test_parent_profile_that_is_not_utf8_text(in_tmp, capsys):
    (in_tmp / "parent.yaml").write_bytes("extends: toy\n".encode("utf-16"))
    (in_tmp / "child.yaml").write_text("extends: ./parent.yaml\n")
    assert main(["render", str(in_tmp / "child.yaml"), "--out", str(in_tmp / "out")]) == 2
    err = capsys.readouterr().err
    assert str(in_tmp / "parent.yaml") in err and "UTF-16" in err and "Traceback" not in err


def test_suggested_iconv_command_gives_a_profile_that_loads(in_tmp):
    import re
    import shlex
    import subprocess

    path = in_tmp / "wide.yaml"
    path.write_bytes("extends: toy\ndescription: \u00e9t\u00e9 \u4f60\u597d\n".encode("utf-16"))
    err = run_cli("render", str(path), cwd=in_tmp).stderr
    command = re.search(r"`(iconv [^`]+)`", err).group(1)
    subprocess.run(command, shell=True, check=True, cwd=in_tmp)  # the message's own command, as a user pastes it
    converted = Path(shlex.split(command)[-1])
    assert load_profile(str(converted)).values["description"] == "\u00e9t\u00e9 \u4f60\u597d"

"""Profile values holding shell syntax arrive verbatim and never run; secrets travel by environment only;
nothing in a run directory is world-writable."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sftjobs.cli import main
from tests.conftest import run_cli
from tests.slurm_helpers import FAKE_PYTHON, wait_until

NASTY = "ck/$(touch PWNED1)`touch PWNED2`;touch PWNED3 'q' \"dq\" \\\nnext-line"


def test_shell_syntax_in_paths_arrives_verbatim_and_never_runs(in_tmp):
    result = run_cli("render", "toy", "--out", str(in_tmp / "run"), "--set", f"output_dir={NASTY}",
                     "--set", f"data.dir={NASTY}-data", cwd=in_tmp)
    assert result.returncode == 0, result.stderr
    run = in_tmp / "run"
    cfg = yaml.safe_load((run / "llamafactory" / "train.yaml").read_text())
    assert cfg["output_dir"] == str(in_tmp / NASTY)
    info = json.loads((run / "dataset" / "dataset_info.json").read_text())
    assert info["arpo_sft_toy"]["file_name"] == str(in_tmp / (NASTY + "-data")) + "/arpo_sft_toy.jsonl"
    # run the launch script with a stand-in python that prints what the shell handed it
    probe = in_tmp / "probe.sh"
    probe.write_text('#!/bin/sh\nprintf "%s" "$HF_DATASETS_CACHE" > "$5/cache_seen"\n')
    probe.chmod(0o755)
    script = (run / "steps" / "train.sh").read_text().replace(sys.executable, str(probe))
    (run / "steps" / "train.sh").write_text(script)
    subprocess.run(["bash", str(run / "steps" / "train.sh")], check=True, cwd=in_tmp, timeout=30)
    assert (run / "cache_seen").read_text() == str(in_tmp / (NASTY + "-data")) + "/.hf_datasets_cache"
    assert not list(in_tmp.rglob("PWNED*")) and not list(run.rglob("PWNED*"))


@pytest.mark.parametrize("key,value", [
    ("resources.partition", "gpu\n#SBATCH --uid=0"),
    ("resources.account", "acct'; touch PWNED"),
    ("resources.qos", "$(touch PWNED)"),
    ("resources.sbatch_extra", "['--exclusive', '--comment=a b']"),
])
def test_values_bound_for_sbatch_lines_reject_shell_syntax(key, value, in_tmp, capsys):
    assert main(["render", "toy", "--out", str(in_tmp / "run"), "--set", f"{key}={value}"]) == 2
    err = capsys.readouterr().err
    assert key in err and "without spaces, quotes or newlines" in err or "no spaces, quotes or newlines" in err
    assert not (in_tmp / "run").exists()


def test_hf_token_never_written_and_no_world_writable_files(in_tmp, capsys):
    secret = "hf_SECRETsecret0123456789"
    env = {"HF_TOKEN": secret, "HUGGING_FACE_HUB_TOKEN": secret, "FAKE_SLEEP": "0"}
    result = run_cli("submit", "toy", "--executor", "local", "--set", f"launcher.python={FAKE_PYTHON}", cwd=in_tmp,
                     env=env)
    assert result.returncode == 0, result.stderr
    run_dir = next(Path(os.environ["SFTJOBS_JOBS_DIR"]).iterdir())

    def done():
        chain = json.loads((run_dir / "local" / "chain.json").read_text())["steps"]
        return all(s["state"] == "COMPLETED" for s in chain.values())

    wait_until(done, 60, 0.5, "the chain")
    fake_env = run_dir / "fake"
    for path in run_dir.rglob("*"):
        if path.is_file() and not path.is_relative_to(fake_env):  # fake/ is the test's own env dump
            assert secret not in path.read_text(errors="replace"), f"secret written into {path}"
        mode = path.lstat().st_mode
        assert not mode & stat.S_IWOTH, f"{path} is world-writable"
    # the steps did receive it, through the environment
    assert "HF_TOKEN=" + secret in (fake_env / "data.0.env").read_text()

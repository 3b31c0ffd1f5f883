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
from sftjobs.executors.slurm import slurm_job_name
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


# ----------------------------------------------------------------------------- every user text, every sink
# Each string below goes, in one render, into every place user text reaches: a path (output_dir, data.dir,
# model.local_dir, --out, launcher.python's folder), a passed-through LLaMA-Factory value, the description and
# the jobs directory; it must come back verbatim from every parser that reads it (bash, PyYAML, OmegaConf as
# LLaMA-Factory's read_args uses it, json, sbatch's quoting) and nothing in it may run.
NASTY_VALUES = [
    ("newline", "a\nlearning_rate: 9\n#SBATCH --uid=0\ntouch PWNED_NL"),
    ("carriage-return", "a\rtouch PWNED_CR\r"),
    ("quotes", "q'\"'\"x\"\\"),
    ("command-substitution", "$(touch PWNED_SUBST)"),
    ("backticks", "`touch PWNED_BT`"),
    ("semicolon", "x;touch PWNED_SEMI;"),
    ("hash", "x #comment"),
    ("yaml-syntax", "key: value\n- item\n{a: [b]}: &x *x"),
    ("jinja-syntax", "{{ 7*7 }}{% if true %}J{% endif %}{# c #}"),
    ("unicode-line-breaks", "a\x85b\u2028c\u2029d\x1b[31m"),
]
PROBE = """#!/bin/sh
# Stands in for launcher.python: records what the shell handed it ($5 is the run directory).
printf '%s' "$HF_DATASETS_CACHE" > "$5/cache_seen_$3"
printf '%s' "${MASTER_PORT:-}" > "$5/port_seen_$3"
printf '%s\\n' "$@" > "$5/argv_seen_$3"
"""


def _read(path: Path) -> str:
    return path.read_bytes().decode()  # read_text would turn a carriage return into a newline


def _nasty_profile(tmp: Path, value: str, python: str) -> Path:
    path = tmp / "nasty.yaml"
    path.write_text(yaml.safe_dump({
        "extends": "toy", "description": value, "output_dir": f"ck/{value}", "deepspeed": "none",
        "model": {"local_dir": f"m/{value}"}, "data": {"dir": f"d/{value}"},
        "launcher": {"python": python, "setup": ["printf '%s' '{{ 7*7 }}{% if 1 %}' > jinja_seen"]},
        "train": {"run_name": value, "template": "qwen"}}, allow_unicode=True))
    return path


def _probe(tmp: Path, value: str) -> Path:
    folder = tmp / f"bin {value}"
    folder.mkdir(parents=True)
    probe = folder / "python"
    probe.write_text(PROBE)
    probe.chmod(0o755)
    return probe


@pytest.mark.parametrize("value", [v for _, v in NASTY_VALUES], ids=[i for i, _ in NASTY_VALUES])
def test_user_text_arrives_verbatim_in_every_rendered_file_and_never_runs(value, in_tmp):
    from omegaconf import OmegaConf

    probe = _probe(in_tmp, value)
    run = in_tmp / f"run {value}"
    result = run_cli("render", str(_nasty_profile(in_tmp, value, str(probe))), "--out", str(run), cwd=in_tmp)
    assert result.returncode == 0, result.stderr
    for name in ("train.yaml", "dry_run.yaml"):
        text = (run / "llamafactory" / name).read_text()
        cfg = yaml.safe_load(text)
        assert OmegaConf.to_container(OmegaConf.load(run / "llamafactory" / name)) == cfg  # what LLaMA-Factory reads
        assert cfg["run_name"] == value and cfg["learning_rate"] == 7.0e-6 and "key" not in cfg
        assert cfg["model_name_or_path"] == str(in_tmp / "m" / value)
        assert cfg["dataset_dir"] == str(run / "dataset")
        assert cfg["output_dir"] == str(in_tmp / "ck" / value) + ("-dry-run" if name == "dry_run.yaml" else "")
        assert text.startswith("# LLaMA-Factory 0.9.5 training config for the ") and "run of nasty.\n" in text
    info = json.loads((run / "dataset" / "dataset_info.json").read_text())
    assert info["arpo_sft_toy"]["file_name"] == str(in_tmp / "d" / value / "arpo_sft_toy.jsonl")
    assert yaml.safe_load((run / "profile.yaml").read_text())["values"]["description"] == value
    plan = json.loads((run / "plan.json").read_text())
    assert plan["paths"]["run_dir"] == str(run)
    for script in sorted((run / "steps").glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)
    # run the launch scripts: the probe sees the exact paths; a job id with shell syntax cannot run either
    env = {**os.environ, "SLURM_JOB_ID": "x[$(touch PWNED_ARITH)]", "SLURM_NODEID": "0"}
    for step in ("data", "train"):
        subprocess.run(["bash", str(run / "steps" / f"{step}.sh")], check=True, cwd=in_tmp, timeout=30, env=env)
        assert _read(run / f"cache_seen_{step}") == str(in_tmp / "d" / value / ".hf_datasets_cache")
        assert _read(run / f"argv_seen_{step}") == f"-m\nsftjobs.steps\n{step}\n--run-dir\n{run}\n"
    assert _read(run / "port_seen_train").isdigit()
    assert _read(run / "jinja_seen") == "{{ 7*7 }}{% if 1 %}"  # templates never evaluate a value
    assert not list(in_tmp.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))


def test_user_text_through_the_local_executor_never_runs(in_tmp, capsys):
    """One string with every syntax at once, as a jobs directory, paths, a --set value and launcher.python's
    folder, through the real local executor: the whole chain completes and no marker file appears."""
    from tests.slurm_helpers import wait_until

    value = "a\nb\r'\"$(touch PWNED1)`touch PWNED2`;touch PWNED3 #c: [d] {{ 7*7 }}{% if 1 %}\\"
    python = _probe(in_tmp, value).with_name("fake_python")
    python.write_text(FAKE_PYTHON.read_text() + 'printf "%s" "$HF_DATASETS_CACHE" > "$run_dir/cache_seen_$step"\n')
    python.chmod(0o755)
    jobs = in_tmp / f"jobs {value}"
    result = run_cli("submit", str(_nasty_profile(in_tmp, value, str(python))), "--executor", "local",
                     "--set", f"train.run_name={value}", cwd=in_tmp, env={"SFTJOBS_JOBS_DIR": str(jobs)})
    assert result.returncode == 0, result.stderr
    run_dir = next(jobs.iterdir())
    assert run_dir.name.startswith("nasty-")

    def done():
        chain = json.loads((run_dir / "local" / "chain.json").read_text())["steps"]
        return chain if all(s["state"] in ("COMPLETED", "FAILED", "CANCELLED") for s in chain.values()) else None

    chain = wait_until(done, 90, 0.5, "the local chain")
    assert {s["state"] for s in chain.values()} == {"COMPLETED"}, chain
    assert yaml.safe_load((run_dir / "llamafactory" / "train.yaml").read_text())["run_name"] == value
    for step in (p.stem for p in (run_dir / "steps").glob("*.sh")):  # every job ran here, with the exact cache path
        assert _read(run_dir / f"cache_seen_{step}") == str(in_tmp / "d" / value / ".hf_datasets_cache")
    assert _read(run_dir / "jinja_seen") == "{{ 7*7 }}{% if 1 %}"
    assert not list(in_tmp.rglob("PWNED*"))


@pytest.mark.parametrize("name", ["x\ntouch PWNED", "$(touch PWNED)", "`touch PWNED`", "a;touch PWNED"])
def test_unsafe_profile_name_through_the_local_executor_submits_nothing(name, in_tmp):
    path = in_tmp / f"{name}.yaml"
    path.write_text(f"extends: toy\nlauncher:\n  python: {FAKE_PYTHON}\n")
    result = run_cli("submit", str(path), "--executor", "local", cwd=in_tmp)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "[A-Za-z0-9._-]" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not Path(os.environ["SFTJOBS_JOBS_DIR"]).exists() and not list(in_tmp.rglob("PWNED*"))


def _slurm_requests(run_dir: Path):
    from sftjobs.executors.slurm import SlurmExecutor
    from sftjobs.planning.dag import build_plan
    from sftjobs.profile import load_profile

    plan = build_plan(load_profile("toy", ["resources.partition=debug"]))
    return SlurmExecutor(need_sbatch=False).prepare(plan, run_dir)


def test_sbatch_lines_of_a_run_directory_with_shell_syntax(in_tmp):
    """Spaces, quotes, $(), backticks, ; and # reach the #SBATCH lines quoted: each line still reads as one
    option (sbatch reads quotes as sh does; checked on Slurm 22.05) and the block keeps every directive."""
    import shlex

    run_dir = in_tmp / "jobs a'b\"c $(touch PWNED) `touch PWNED`;#x" / "toy-1"
    for request in _slurm_requests(run_dir):
        lines = request.text.splitlines()
        block = lines[3:lines.index("", 3)]
        options = dict(shlex.split(line)[1].lstrip("-").split("=", 1) for line in block)
        assert all(len(shlex.split(line)) == 2 and line.startswith("#SBATCH --") for line in block)
        assert {"job-name", "output", "partition", "time", "mem"} <= set(options)
        assert options["job-name"] == slurm_job_name(request.step, "toy-1")
        assert options["output"] == f"{run_dir}/slurm/{request.step}/%j_0_log.out"
        assert ("dependency" in options) == bool(request.after)
        subprocess.run(["bash", "-n"], input=request.text, text=True, check=True)
    assert not list(in_tmp.rglob("PWNED*"))


@pytest.mark.parametrize("bad", ["new\nline", "car\rriage", "back\\slash", "per%jcent"])
def test_run_directory_sbatch_cannot_quote_is_refused_before_anything_is_queued(bad, in_tmp):
    from sftjobs.errors import SftjobsError
    from sftjobs.executors.slurm import SlurmExecutor
    from sftjobs.planning.dag import build_plan
    from sftjobs.profile import load_profile

    run_dir = in_tmp / f"jobs {bad}" / "toy-1"
    with pytest.raises(SftjobsError, match="#SBATCH lines") as caught:
        _slurm_requests(run_dir)
    assert "SFTJOBS_JOBS_DIR" in str(caught.value)
    with pytest.raises(SftjobsError, match="the run directory"):  # submit refuses before the first sbatch
        SlurmExecutor(need_sbatch=False).submit(build_plan(load_profile("toy")), run_dir)
    assert not run_dir.exists()


def test_resume_path_reaches_llamafactory_verbatim(in_tmp):
    """The train step passes resume_from_checkpoint=PATH, which LLaMA-Factory reads as YAML (OmegaConf.from_cli):
    a checkpoint under an output_dir holding " #", ": " or a newline arrives as the same path."""
    from omegaconf import OmegaConf

    from sftjobs.steps.train import training_command

    for _, value in NASTY_VALUES:
        checkpoint = in_tmp / f"ck {value}" / "checkpoint-5"
        argument = training_command(Path("/r/train.yaml"), checkpoint, env={})[-1]
        assert OmegaConf.to_container(OmegaConf.from_cli([argument])) == {"resume_from_checkpoint": str(checkpoint)}


def test_local_preview_is_a_command_line_that_quotes_its_paths(in_tmp):
    import shlex

    from sftjobs.executors.local import LocalExecutor
    from sftjobs.planning.dag import build_plan
    from sftjobs.profile import load_profile

    run_dir = in_tmp / "jobs $(touch PWNED) a;b" / "toy-1"
    for request in LocalExecutor().prepare(build_plan(load_profile("toy")), run_dir):
        assert shlex.split(request.text) == ["bash", f"{run_dir}/steps/{request.step}.sh", ">",
                                             f"{run_dir}/logs/{request.step}.log", "2>&1"]


def test_profiles_list_shows_each_profile_on_one_line(in_tmp, capsys):
    (in_tmp / "configs").mkdir()
    (in_tmp / "configs" / "odd.yaml").write_text(yaml.safe_dump({"extends": "toy", "description": "a\nb\x1b[2J"}))
    assert main(["profiles"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("odd "))
    assert "a\\nb\\x1b[2J" in line


@pytest.mark.slurm
def test_shell_syntax_in_the_jobs_directory_through_real_sbatch(slurm, in_tmp, capsys):
    """The whole chain on the Slurm test cluster from a jobs directory holding spaces, quotes, $(), backticks,
    ; and #: sbatch reads every #SBATCH line as written (logs land in the run directory) and nothing runs."""
    from tests.slurm_helpers import SMALL, wait_until

    jobs = in_tmp / "jobs a'b\"c $(touch PWNED1) `touch PWNED2`;touch PWNED3 #x"
    os.environ["SFTJOBS_JOBS_DIR"] = str(jobs)  # in_tmp's monkeypatch restores it
    args = ["submit", "toy", "--executor", "slurm", "--set", f"launcher.python={FAKE_PYTHON}"]
    for item in SMALL:
        args += ["--set", item]
    code = main(args)
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    run_dir = next(jobs.iterdir())

    def done():
        assert main(["status", run_dir.name, "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)["steps"]
        return rows if all(r["state"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for r in rows) else None

    rows = wait_until(done, 300, 2, "the Slurm chain")
    assert {r["state"] for r in rows} == {"COMPLETED"}, rows
    for step in ("data", "train"):
        assert list((run_dir / "slurm" / step).glob("*_log.out")), f"no Slurm log of {step} in the run directory"
        assert (run_dir / "fake" / f"{step}.0.env").exists()
    assert not list(in_tmp.rglob("PWNED*"))

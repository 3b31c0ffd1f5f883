"""Issue 19.10: mistakes caught before anything is queued: a local model or data path that does not exist, an
unknown LLaMA-Factory template (LLaMA-Factory's own registry where it is installed), and did-you-mean with the full
key. Each through the real CLI: exit 2, one message naming the key and what to do, no run directory made."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sftjobs.cli import main
from sftjobs.preflight_checks import llamafactory_templates
from tests.conftest import run_cli
from tests.slurm_helpers import FAKE_PYTHON

LOCAL = ["--executor", "local", "--set", f"launcher.python={FAKE_PYTHON}"]


def submit_refused(capsys, *sets: str) -> str:
    args = ["submit", "toy", *LOCAL]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("sftjobs: error: ") and "Traceback" not in err
    jobs = Path(os.environ["SFTJOBS_JOBS_DIR"])
    assert not jobs.exists() or not [p for p in jobs.iterdir() if p.name.startswith("toy-")], "a run was made"
    return err


def test_missing_local_data_path_is_refused_before_queueing(in_tmp, capsys):
    err = submit_refused(capsys, "data.source=path", f"data.path={in_tmp / 'nosuch.jsonl'}")
    assert "data.path" in err and str(in_tmp / "nosuch.jsonl") in err and "does not exist" in err


def test_data_path_that_is_a_folder_is_refused(in_tmp, capsys):
    (in_tmp / "folder").mkdir()
    err = submit_refused(capsys, "data.source=path", f"data.path={in_tmp / 'folder'}")
    assert "data.path" in err and "is a folder, not a file" in err


def test_missing_local_model_path_is_refused_before_queueing(in_tmp, capsys):
    err = submit_refused(capsys, "model.source=path", "model.path=/nonexistent/model")
    assert "model.path '/nonexistent/model'" in err and "does not exist" in err and "model.hub_id" in err


def test_relative_local_path_is_checked_against_the_store(in_tmp, capsys, monkeypatch):
    # relative profile paths resolve against the run store's parent folder, not the current directory
    store = Path(os.environ["SFTJOBS_JOBS_DIR"]).parent
    (in_tmp / "elsewhere").mkdir()
    monkeypatch.chdir(in_tmp / "elsewhere")
    (in_tmp / "elsewhere" / "mine.jsonl").write_text("")  # in the current directory only
    err = submit_refused(capsys, "data.source=path", "data.path=mine.jsonl")
    assert str(store / "mine.jsonl") in err


def test_existing_local_paths_and_hub_sources_pass(in_tmp, capsys):
    (in_tmp / "model").mkdir()
    (in_tmp / "data.jsonl").write_text("")
    args = ["submit", "toy", *LOCAL, "--preview", "--set", "model.source=path", "--set", f"model.path={in_tmp / 'model'}",
            "--set", "data.source=path", "--set", f"data.path={in_tmp / 'data.jsonl'}"]
    assert main(args) == 0, capsys.readouterr().err
    # hub sources are not looked for on this machine
    assert main(["submit", "toy", *LOCAL, "--preview"]) == 0, capsys.readouterr().err


def test_unknown_template_is_refused_with_llamafactorys_names(in_tmp, capsys):
    if not llamafactory_templates():
        pytest.skip("llamafactory is not installed here")
    err = submit_refused(capsys, "train.template=qwen3x")
    assert "train.template 'qwen3x' is not a LLaMA-Factory template" in err and "did you mean 'qwen3'" in err
    # --preview refuses it too: it is the same code path
    assert main(["submit", "toy", *LOCAL, "--preview", "--set", "train.template=nosuchtemplate"]) == 2
    assert "train.template 'nosuchtemplate'" in capsys.readouterr().err


def test_template_registry_matches_llamafactorys_own():
    llamafactory = pytest.importorskip("llamafactory.data.template")
    assert llamafactory_templates() == frozenset(llamafactory.TEMPLATES)


def test_template_check_is_skipped_quietly_without_llamafactory(in_tmp, tmp_path):
    # a login node without LLaMA-Factory: a stand-in package "llamafactory" that is not one hides the real one
    (tmp_path / "shadow" / "llamafactory").mkdir(parents=True)
    (tmp_path / "shadow" / "llamafactory" / "__init__.py").write_text("")
    env = {"PYTHONPATH": f"{tmp_path / 'shadow'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = run_cli("submit", "toy", *LOCAL, "--preview", "--set", "train.template=nosuchtemplate", cwd=in_tmp, env=env)
    assert result.returncode == 0, result.stderr
    assert "template" not in result.stderr


@pytest.mark.parametrize("text,wanted", [
    ("resorces:\n  nodes: 1\n", "unknown key 'resorces' (did you mean 'resources'?)"),
    ("cutoff_len: 512\n", "unknown key 'cutoff_len' (did you mean 'train.cutoff_len'?)"),
    ("partition: gpu\n", "unknown key 'partition' (did you mean 'resources.partition'?)"),
    ("modle:\n  hub_id: x\n", "(did you mean 'model'?)"),
])
def test_did_you_mean_names_the_full_key(in_tmp, text, wanted):
    (in_tmp / "mine.yaml").write_text("extends: toy\n" + text)
    result = run_cli("render", str(in_tmp / "mine.yaml"), cwd=in_tmp)
    assert result.returncode == 2 and wanted in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_did_you_mean_for_set_keys(in_tmp, capsys):
    assert main(["render", "toy", "--set", "resorces.nodes=2"]) == 2
    assert "unknown key 'resorces' (did you mean 'resources'?)" in capsys.readouterr().err

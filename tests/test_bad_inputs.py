"""The bad-input corpus through the real entry points (the data and model steps as jobs run them, submit to
the real Slurm cluster, preflight on a real filesystem): one clear message, exit code 2, no traceback,
nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sftjobs.cli import main
from tests.conftest import run_cli
from tests.slurm_helpers import FAKE_PYTHON, SMALL

CORPUS = Path(__file__).parent / "bad_inputs"

# data file, data.shape, data.max_bad_fraction, words the message must contain
DATA_CASES = [
    ("empty.jsonl", "sharegpt", 0.0, ["empty"]),
    ("blank_lines.jsonl", "sharegpt", 0.0, ["no records"]),
    ("truncated_line.jsonl", "sharegpt", 0.0, ["line 3", "1 of 4"]),
    ("wrong_roles.jsonl", "sharegpt", 0.0, ["line 2", "human"]),
    ("openai_roles.jsonl", "auto", 0.0, ["user", "assistant"]),
    ("empty_turn.jsonl", "sharegpt", 0.0, ["line 2", "empty"]),
    ("alpaca_as_sharegpt.json", "sharegpt", 0.0, ["alpaca", "sharegpt", "data.shape"]),
    ("sharegpt_as_alpaca.jsonl", "alpaca", 0.0, ["sharegpt", "alpaca", "data.shape"]),
    ("broken_array.json", "auto", 0.0, ["record 2"]),
    ("not_json.csv", "auto", 0.0, ["line 1"]),
    ("unknown_shape.jsonl", "auto", 0.0, ["prompt", "completion"]),
    ("/nonexistent/data.jsonl", "sharegpt", 0.0, ["/nonexistent/data.jsonl"]),
]


def render_demo(tmp: Path, *sets: str) -> Path:
    run = tmp / "run"
    args = ["render", "demo", "--out", str(run), "--set", f"data.dir={tmp / 'data'}"]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    return run


def run_step(step: str, run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sftjobs.steps", step, "--run-dir", str(run)], capture_output=True,
                          text=True, timeout=300)


def assert_one_clear_failure(result: subprocess.CompletedProcess, step: str, words: list[str]) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    line = next(ln for ln in result.stderr.splitlines() if ln.startswith(f"sftjobs: step {step} failed: "))
    message = line + "\n" + result.stderr.split(line, 1)[1]
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    return message


@pytest.mark.parametrize("name,shape,fraction,words", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file(name, shape, fraction, words, in_tmp, capsys):
    source = name if name.startswith("/") else str(CORPUS / name)
    run = render_demo(in_tmp, "data.source=path", f"data.path={source}", f"data.shape={shape}",
                      f"data.max_bad_fraction={fraction}")
    capsys.readouterr()
    assert_one_clear_failure(run_step("data", run), "data", words)
    leftovers = [p for p in (in_tmp / "data").rglob("*") if p.is_file()] if (in_tmp / "data").exists() else []
    assert not leftovers, f"half-written: {leftovers}"
    status = (run / "reports" / "status" / "data.json").read_text()
    assert '"FAILED"' in status


def make_model_dir(tmp: Path, drop: str) -> Path:
    from sftjobs.io.demo_assets import make_demo_model, make_synthetic_arpo

    corpus = make_synthetic_arpo(tmp / "corpus.jsonl", 50)
    model = make_demo_model(tmp / "model", corpus, log=lambda *_: None)
    for path in list(model.glob(drop)):
        path.unlink()
    return model


@pytest.mark.parametrize("drop,words", [("*.safetensors", ["weights"]), ("tokenizer*", ["tokenizer"])])
def test_incomplete_model_dir(drop, words, in_tmp, capsys):
    model = make_model_dir(in_tmp, drop)
    run = render_demo(in_tmp, "model.source=path", f"model.path={model}")
    capsys.readouterr()
    assert_one_clear_failure(run_step("model", run), "model", [str(model), *words])


def test_missing_model_path(in_tmp, capsys):
    run = render_demo(in_tmp, "model.source=path", "model.path=/nonexistent/model")
    capsys.readouterr()
    assert_one_clear_failure(run_step("model", run), "model", ["/nonexistent/model", "model.path"])


def test_unwritable_run_store(in_tmp):
    blocker = in_tmp / "file"
    blocker.write_text("not a folder")
    result = run_cli("render", "toy", "--out", str(blocker / "run"), cwd=in_tmp)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot create the run directory" in result.stderr and str(blocker / "run") in result.stderr


@pytest.mark.slurm
@pytest.mark.parametrize("key,value,words", [
    ("resources.partition", "nosuchpartition", ["sbatch refused step data", "invalid partition"]),
    ("resources.account", "nosuchaccount", ["sbatch refused step data", "account"]),
    ("resources.qos", "nosuchqos", ["sbatch refused step data", "qos"]),
])
def test_sbatch_rejects_the_request(key, value, words, slurm, in_tmp, capsys):
    args = ["submit", "toy", "--executor", "slurm", "--set", f"{key}={value}", "--set", f"launcher.python={FAKE_PYTHON}"]
    for item in SMALL:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for word in words:
        assert word.lower() in err.lower(), err


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "sftjobs-test", str(path)], check=True)


@pytest.mark.train
@pytest.mark.parametrize("options,words", [
    ("size=1m", ["disk", "output_dir"]),          # too little disk for the checkpoints
    ("ro,size=1m", ["not writable", "output_dir"]),  # a read-only filesystem under output_dir
])
def test_preflight_refuses_a_bad_output_filesystem(options, words, in_tmp, capsys):
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs: run it as root (tests/run.sh and CI do)")
    mount = in_tmp / "mnt"
    _mount_tmpfs(mount, options)
    try:
        run = render_demo(in_tmp, f"output_dir={mount / 'ck'}")
        capsys.readouterr()
        for step in ("data", "model"):
            assert run_step(step, run).returncode == 0
        assert_one_clear_failure(run_step("preflight", run), "preflight", words)
        assert not (mount / "ck").exists()
    finally:
        subprocess.run(["umount", str(mount)], check=False)

"""The bad-input corpus through the real entry points (the data and model steps as jobs run them, submit to
the real Slurm cluster, preflight on a real filesystem): one clear message, exit code 2, no traceback,
nothing half-written."""

from __future__ import annotations

import json
import os
import re
import shlex
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


SHAREGPT_ROWS = [{"conversations": [{"from": "human", "value": f"q{i} \u00e9t\u00e9 \u4f60\u597d"},
                                    {"from": "gpt", "value": f"a{i}"}]} for i in range(6)]
SHAREGPT_TEXT = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in SHAREGPT_ROWS)

# data files that are not UTF-8: the bytes, the words of the message. The threshold is loose (all rows may be
# bad), as when a careless profile raises it: not one byte of these may still reach the training file.
ENCODED = [
    ("utf-16-bom", SHAREGPT_TEXT.encode("utf-16"), ["UTF-16 (little-endian, with a byte-order mark)", "iconv -f UTF-16 -t UTF-8"]),
    ("utf-16le", SHAREGPT_TEXT.encode("utf-16-le"), ["UTF-16 (little-endian, no byte-order mark)", "iconv -f UTF-16LE"]),
    ("utf-16be", SHAREGPT_TEXT.encode("utf-16-be"), ["UTF-16 (big-endian, no byte-order mark)", "iconv -f UTF-16BE"]),
    ("utf-32-bom", SHAREGPT_TEXT.encode("utf-32"), ["UTF-32 (little-endian, with a byte-order mark)", "iconv -f UTF-32 -t"]),
    ("utf-32le", SHAREGPT_TEXT.encode("utf-32-le"), ["UTF-32 (little-endian, no byte-order mark)", "iconv -f UTF-32LE"]),
    ("gzip", __import__("gzip").compress(SHAREGPT_TEXT.encode()), ["gzip-compressed", "gunzip -c"]),
    ("latin-1", SHAREGPT_TEXT.replace("\u4f60\u597d", "").encode("latin-1"), ["not valid UTF-8", "iconv -f LATIN1 -t UTF-8"]),
]


@pytest.mark.parametrize("case_id,blob,words", ENCODED, ids=[c[0] for c in ENCODED])
def test_data_file_that_is_not_utf8(case_id, blob, words, in_tmp, capsys):
    source = in_tmp / f"{case_id}.jsonl"
    source.write_bytes(blob)
    run = render_demo(in_tmp, "data.source=path", f"data.path={source}", "data.max_bad_fraction=1.0")
    capsys.readouterr()
    assert_one_clear_failure(run_step("data", run), "data", [str(source), *words])
    leftovers = [p for p in (in_tmp / "data").rglob("*") if p.is_file()] if (in_tmp / "data").exists() else []
    assert not leftovers, f"half-written: {leftovers}"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le"])
def test_the_suggested_iconv_command_gives_the_same_records(encoding, in_tmp, capsys):
    source = in_tmp / "wide.jsonl"
    source.write_bytes(SHAREGPT_TEXT.encode(encoding))
    run = render_demo(in_tmp, "data.source=path", f"data.path={source}")
    capsys.readouterr()
    message = assert_one_clear_failure(run_step("data", run), "data", ["iconv"])
    command = re.search(r"`(iconv [^`]+)`", message).group(1)
    subprocess.run(command, shell=True, check=True, cwd=in_tmp)  # the message's own command, as pasted
    converted = Path(shlex.split(command)[-1])
    run = render_demo(in_tmp / "again", "data.source=path", f"data.path={converted}")
    result = run_step("data", run)
    assert result.returncode == 0, result.stderr[-2000:]
    written = (in_tmp / "again" / "data" / "arpo_sft_54k.jsonl").read_bytes()
    assert [json.loads(line) for line in written.decode("utf-8").splitlines()] == SHAREGPT_ROWS


def test_lines_that_are_not_utf8_never_reach_the_training_file(in_tmp, capsys):
    """With a loose threshold the bad lines are dropped, never copied: a Latin-1 line, a UTF-16 line, a lone NUL
    and UTF-8-encoded surrogates (which json.loads(bytes) accepts) among good UTF-8 lines."""
    good = SHAREGPT_TEXT.encode()
    bad = [json.dumps(SHAREGPT_ROWS[0], ensure_ascii=False).encode("latin-1", "replace").replace(b"?", b"\xe9"),
           json.dumps(SHAREGPT_ROWS[1]).encode("utf-16-le"), b"\x00",
           b'{"conversations": [{"from": "human", "value": "\xed\xa0\x80"}, {"from": "gpt", "value": "x"}]}']
    source = in_tmp / "mixed.jsonl"
    source.write_bytes(good * 5 + b"\n".join(bad) + b"\n" + good)
    run = render_demo(in_tmp, "data.source=path", f"data.path={source}", "data.max_bad_fraction=0.5")
    capsys.readouterr()
    result = run_step("data", run)
    assert result.returncode == 0, result.stderr[-2000:]
    written = (in_tmp / "data" / "arpo_sft_54k.jsonl").read_bytes()
    assert [json.loads(line) for line in written.decode("utf-8").splitlines()] == SHAREGPT_ROWS * 6
    report = json.loads((run / "reports" / "data.json").read_text())
    assert report["bad"] == len(bad) and any("not valid UTF-8" in e["reason"] for e in report["bad_examples"])


def test_preflight_data_reader_names_the_encoding(in_tmp):
    from sftjobs.errors import SftjobsError
    from sftjobs.steps.preflight import _first_records

    source = in_tmp / "arpo_sft_toy.jsonl"
    source.write_bytes(SHAREGPT_TEXT.encode("utf-16"))
    with pytest.raises(SftjobsError, match=r"UTF-16 \(little-endian, with a byte-order mark\).*iconv -f UTF-16"):
        _first_records(source, 8)


def test_data_path_that_is_a_directory_says_so(in_tmp, capsys):
    (in_tmp / "folder").mkdir()
    run = render_demo(in_tmp, "data.source=path", f"data.path={in_tmp / 'folder'}")
    capsys.readouterr()
    message = assert_one_clear_failure(run_step("data", run), "data", [str(in_tmp / "folder"), "is a directory"])
    assert "does not exist" not in message


def test_unterminated_string_names_its_column_once(in_tmp, capsys):
    source = in_tmp / "cut.jsonl"
    source.write_text('{"conversations": "cut off\n')
    run = render_demo(in_tmp, "data.source=path", f"data.path={source}")
    capsys.readouterr()
    message = assert_one_clear_failure(run_step("data", run), "data", ["Unterminated string starting at column 19"])
    assert "at at" not in message


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
    # submit's cluster check knows the partitions before sbatch is asked (nothing is queued)
    ("resources.partition", "nosuchpartition", ["resources.partition 'nosuchpartition' is not a partition",
                                                "debug, short"]),
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

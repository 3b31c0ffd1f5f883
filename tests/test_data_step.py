"""The data step (sftjobs/io/data_files.py): shape detection, bad-record accounting, atomic outputs, reruns."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import pytest
from synthetic_data import SYSTEM_PROMPT, ArpoSynth, write_json_array, write_jsonl

from sftjobs.errors import SftjobsError
from sftjobs.io import data_files as data_step
from sftjobs.io.data_files import (
    dataset_info_entry,
    detect_shape,
    iter_records,
    prepare_data,
    validate_alpaca,
    validate_sharegpt,
)

N_SHAREGPT = 3000
N_ALPACA = 2000
OUTPUT_NAMES = {"arpo_sft_54k.jsonl", "arpo_sft_toy.jsonl", "dataset_info.json", "data_report.json"}


def _turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"from": role, "value": value} for role, value in pairs]


# line number (1-based) -> (planted line, words the reason must contain)
SHAREGPT_BAD: dict[int, tuple[object, str]] = {
    10: ("TRUNCATED", "not valid JSON"),
    250: ({"conversations": _turns(("user", "q"), ("assistant", "a")), "system": "s"}, "OpenAI"),
    500: ({"conversations": _turns(("human", "q"), ("gpt", "   ")), "system": "s"}, "turn 2 (gpt) is empty"),
    1000: ({"conversations": _turns(("human", "q"), ("human", "q2"), ("gpt", "a"))}, "expected 'gpt'"),
    1500: ({"system": "s", "turns": []}, "missing key 'conversations'"),
    2000: ({"conversations": _turns(("human", "q"), ("gpt", "a"), ("human", "q2"))}, "ends with a human turn"),
    2500: ({"conversations": _turns(("human", "q"), ("gpt", "a")), "system": 7}, "'system' is a int"),
    2999: ({"conversations": []}, "'conversations' is empty"),
}

# record index (1-based) -> (planted record, words the reason must contain)
ALPACA_BAD: dict[int, tuple[object, str]] = {
    5: ({"instruction": "q", "input": ""}, "missing key 'output'"),
    100: ({"instruction": "  ", "input": "", "output": "a"}, "'instruction' is empty"),
    700: ({"instruction": "q", "output": ["a", "b"]}, "'output' is a list"),
    1200: ("just a string", "not a JSON object"),
}


def _sharegpt_lines(n: int = N_SHAREGPT, bad: dict = SHAREGPT_BAD, seed: int = 0) -> list:
    synth = ArpoSynth(seed=seed, approx_bytes=1200)
    lines: list = []
    for line_no in range(1, n + 1):
        if line_no in bad:
            planted = bad[line_no][0]
            if planted == "TRUNCATED":
                planted = json.dumps(synth.sharegpt(line_no), ensure_ascii=False)[:-37]
            lines.append(planted)
        else:
            lines.append(synth.sharegpt(line_no))
    return lines


@functools.cache
def _sample_bytes(kind: str) -> bytes:
    # Generated once per session and copied into each test's tmp_path: keeps the suite at seconds.
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"sftjobs-test-{os.getpid()}-{kind}"
    try:
        if kind == "sharegpt":
            write_jsonl(scratch, _sharegpt_lines())
        else:
            synth = ArpoSynth(seed=1, approx_bytes=1000)
            records = [ALPACA_BAD[i][0] if i in ALPACA_BAD else synth.alpaca(i) for i in range(1, N_ALPACA + 1)]
            write_json_array(scratch, records)
        return scratch.read_bytes()
    finally:
        scratch.unlink(missing_ok=True)


@pytest.fixture
def sharegpt_file(tmp_path: Path) -> Path:
    path = tmp_path / "final_5w4_still.jsonl"
    path.write_bytes(_sample_bytes("sharegpt"))
    return path


@pytest.fixture
def alpaca_file(tmp_path: Path) -> Path:
    path = tmp_path / "final_sft_edition9.json"
    path.write_bytes(_sample_bytes("alpaca"))
    return path


def _run(source: Path, out_dir: Path, **kw) -> tuple[dict, list[str]]:
    logged: list[str] = []
    kw.setdefault("toy_samples", 100)
    kw.setdefault("max_bad_fraction", 0.01)
    report = prepare_data(source, out_dir, log=logged.append, **kw)
    return report, logged


def _mtimes(out_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}


# --------------------------------------------------------------------------------------------------
# sharegpt JSON Lines


def test_sharegpt_counts_lines_and_outputs(tmp_path, sharegpt_file):
    out = tmp_path / "out"
    report, logged = _run(sharegpt_file, out)

    assert report["skipped"] is False
    assert report["shape"] == "sharegpt" and report["source"]["container"] == "jsonl"
    assert (report["rows_read"], report["valid"], report["bad"]) == (N_SHAREGPT, N_SHAREGPT - 8, 8)
    assert [b["line"] for b in report["bad_examples"]] == sorted(SHAREGPT_BAD)
    for example in report["bad_examples"]:
        assert SHAREGPT_BAD[example["line"]][1] in example["reason"], example

    assert logged[0].startswith("detected sharegpt shape")
    assert "bad record at line 10: not valid JSON" in "\n".join(logged)
    assert any(line.startswith("8 bad of 3000 records") for line in logged)

    assert {p.name for p in out.iterdir()} == OUTPUT_NAMES  # and no temp files
    source_lines = sharegpt_file.read_bytes().splitlines(keepends=True)
    good = [line for n, line in enumerate(source_lines, 1) if n not in SHAREGPT_BAD]
    full = (out / "arpo_sft_54k.jsonl").read_bytes().splitlines(keepends=True)
    assert full == good  # byte for byte: valid lines are copied, not re-serialised
    assert (out / "arpo_sft_toy.jsonl").read_bytes().splitlines(keepends=True) == good[:100]

    assert report["source"]["sha256"] == hashlib.sha256(sharegpt_file.read_bytes()).hexdigest()
    assert report["outputs"]["arpo_sft_54k"]["sha256"] == hashlib.sha256(b"".join(full)).hexdigest()
    assert report["outputs"]["arpo_sft_toy"]["rows"] == 100
    on_disk = json.loads((out / "data_report.json").read_text())
    assert on_disk["params"] == {
        "toy_samples": 100,
        "max_bad_fraction": 0.01,
        "full_name": "arpo_sft_54k",
        "toy_name": "arpo_sft_toy",
        "expected_shape": None,
    }
    assert "skipped" not in on_disk


def test_sharegpt_dataset_info(tmp_path, sharegpt_file):
    out = tmp_path / "out"
    _run(sharegpt_file, out)
    entry = {"formatting": "sharegpt", "columns": {"messages": "conversations", "system": "system"}}
    assert json.loads((out / "dataset_info.json").read_text()) == {
        "arpo_sft_54k": {"file_name": "arpo_sft_54k.jsonl", **entry},
        "arpo_sft_toy": {"file_name": "arpo_sft_toy.jsonl", **entry},
    }


def test_dataset_info_keeps_other_entries(tmp_path, sharegpt_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}))
    _run(sharegpt_file, out)
    info = json.loads((out / "dataset_info.json").read_text())
    assert set(info) == {"mine", "arpo_sft_54k", "arpo_sft_toy"}


def test_too_many_bad_records_fails_and_leaves_nothing(tmp_path, sharegpt_file):
    out = tmp_path / "out"
    logged: list[str] = []
    with pytest.raises(SftjobsError) as err:
        prepare_data(sharegpt_file, out, toy_samples=100, max_bad_fraction=0.001, log=logged.append)
    message = str(err.value)
    assert "8 of 3000 records are bad" in message
    assert "line 10: not valid JSON" in message and "line 250" in message
    assert "data.max_bad_fraction" in message and str(sharegpt_file) in message
    assert list(out.iterdir()) == []  # no outputs, no temp files
    assert "bad record at line 2999: 'conversations' is empty" in logged


def test_failed_rerun_keeps_earlier_good_outputs(tmp_path, sharegpt_file):
    out = tmp_path / "out"
    _run(sharegpt_file, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SftjobsError):
        _run(sharegpt_file, out, max_bad_fraction=0.0)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_crash_mid_stream_leaves_no_partial_files(tmp_path, sharegpt_file, monkeypatch):
    seen = 0

    def explode(value):
        nonlocal seen
        seen += 1
        if seen == 1500:
            raise KeyboardInterrupt  # e.g. Slurm's SIGINT/SIGTERM halfway through
        return data_step.validate_sharegpt(value)

    monkeypatch.setitem(data_step.VALIDATORS, "sharegpt", explode)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _run(sharegpt_file, out)
    assert list(out.iterdir()) == []


def test_rerun_is_skipped_and_touches_nothing(tmp_path, sharegpt_file):
    out = tmp_path / "out"
    first, _ = _run(sharegpt_file, out)
    before = _mtimes(out)
    second, logged = _run(sharegpt_file, out)
    assert second["skipped"] is True
    assert "nothing to do" in logged[-1]
    assert _mtimes(out) == before
    assert {k: v for k, v in second.items() if k != "skipped"} == {k: v for k, v in first.items() if k != "skipped"}


@pytest.mark.parametrize("change", ["params", "source", "tampered_output", "missing_output"])
def test_rerun_redoes_work_when_anything_changed(tmp_path, sharegpt_file, change):
    out = tmp_path / "out"
    _run(sharegpt_file, out)
    kw = {}
    if change == "params":
        kw["toy_samples"] = 50
    elif change == "source":
        lines = sharegpt_file.read_bytes().splitlines(keepends=True)
        sharegpt_file.write_bytes(b"".join(lines[:-1]))
    elif change == "tampered_output":
        toy = out / "arpo_sft_toy.jsonl"
        data = bytearray(toy.read_bytes())
        data[5] ^= 0x01  # same size, different bytes: only the checksum can tell
        toy.write_bytes(bytes(data))
    else:
        (out / "arpo_sft_54k.jsonl").unlink()
    report, _ = _run(sharegpt_file, out, **kw)
    assert report["skipped"] is False
    assert {p.name for p in out.iterdir()} == OUTPUT_NAMES
    expected_toy = 50 if change == "params" else 100
    assert len((out / "arpo_sft_toy.jsonl").read_bytes().splitlines()) == expected_toy


def test_same_size_source_change_is_caught_by_sha(tmp_path, sharegpt_file):
    out = tmp_path / "out"
    _run(sharegpt_file, out)
    data = bytearray(sharegpt_file.read_bytes())
    i = data.index(b"Question 1:")
    data[i : i + 8] = b"QUESTION"
    sharegpt_file.write_bytes(bytes(data))
    stat = sharegpt_file.stat()
    os.utime(
        sharegpt_file, ns=(stat.st_atime_ns, json.loads((out / "data_report.json").read_text())["source"]["mtime_ns"])
    )
    report, _ = _run(sharegpt_file, out)
    assert report["skipped"] is False


def test_blank_lines_are_skipped_and_lines_still_reported(tmp_path):
    synth = ArpoSynth(seed=2, approx_bytes=400)
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps(synth.sharegpt(1)) + "\n\n" + "{broken\n" + json.dumps(synth.sharegpt(2)) + "\r\n\n",
        encoding="utf-8",
    )
    report, logged = _run(path, tmp_path / "out", max_bad_fraction=0.5)
    assert (report["rows_read"], report["valid"]) == (3, 2)
    assert report["bad_examples"] == [{"line": 3, "record": 2, "reason": report["bad_examples"][0]["reason"]}]
    assert "bad record at record 2 (line 3)" in "\n".join(logged)
    # the CRLF line is written without its \r
    assert b"\r" not in (tmp_path / "out" / "arpo_sft_54k.jsonl").read_bytes()


def test_openai_roles_are_named_as_such(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"conversations": _turns(("user", "q"), ("assistant", "a"))} for _ in range(20)],
    )
    with pytest.raises(SftjobsError, match=r"user.*OpenAI.*'human' and 'gpt'"):
        _run(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_unknown_shape_names_the_keys(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"} for _ in range(5)])
    with pytest.raises(SftjobsError, match=r"keys seen were: completion, prompt"):
        _run(path, tmp_path / "out")
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(SftjobsError, match=r"'messages' \(OpenAI chat format"):
        _run(path, tmp_path / "out")


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{\n  "conversations": []\n}\n')  # one pretty-printed object, not JSON Lines
    with pytest.raises(SftjobsError, match=r"none of its first 3 records is valid JSON \(line 1"):
        _run(path, tmp_path / "out")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"[]", b" [ ]\n", b"\xef\xbb\xbf"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(SftjobsError, match="no records"):
        _run(path, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_source_and_bad_params(tmp_path, sharegpt_file):
    with pytest.raises(SftjobsError, match="does not exist"):
        _run(tmp_path / "nope.jsonl", tmp_path / "out")
    with pytest.raises(SftjobsError, match="data.max_bad_fraction"):
        _run(sharegpt_file, tmp_path / "out", max_bad_fraction=1.5)
    with pytest.raises(SftjobsError, match="data.toy_samples"):
        _run(sharegpt_file, tmp_path / "out", toy_samples=0)
    with pytest.raises(SftjobsError, match="data.shape"):
        _run(sharegpt_file, tmp_path / "out", expected_shape="openai")
    with pytest.raises(SftjobsError, match="different names"):
        _run(sharegpt_file, tmp_path / "out", full_name="x", toy_name="x")


def test_expected_shape_auto_and_match(tmp_path, sharegpt_file):
    assert _run(sharegpt_file, tmp_path / "a", expected_shape="auto")[0]["shape"] == "sharegpt"
    assert _run(sharegpt_file, tmp_path / "b", expected_shape="sharegpt")[0]["shape"] == "sharegpt"


# --------------------------------------------------------------------------------------------------
# alpaca JSON array


def test_alpaca_json_array_counts_and_dataset_info(tmp_path, alpaca_file):
    out = tmp_path / "out"
    report, logged = _run(alpaca_file, out, toy_samples=10)
    assert report["shape"] == "alpaca" and report["source"]["container"] == "json-array"
    assert logged[0].startswith("detected alpaca shape")
    assert (report["rows_read"], report["valid"], report["bad"]) == (N_ALPACA, N_ALPACA - 4, 4)
    assert [b["record"] for b in report["bad_examples"]] == sorted(ALPACA_BAD)
    for example in report["bad_examples"]:
        assert ALPACA_BAD[example["record"]][1] in example["reason"], example
        assert example["line"] == 1  # the whole array is on one line: the record index is what locates it
    assert "bad record at record 5 (line 1): missing key 'output'" in "\n".join(logged)

    rows = [json.loads(line) for line in (out / "arpo_sft_54k.jsonl").read_text().splitlines()]
    source = json.loads(alpaca_file.read_text())
    assert rows == [r for i, r in enumerate(source, 1) if i not in ALPACA_BAD]
    assert len((out / "arpo_sft_toy.jsonl").read_text().splitlines()) == 10

    entry = {
        "formatting": "alpaca",
        "columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system"},
    }
    assert json.loads((out / "dataset_info.json").read_text()) == {
        "arpo_sft_54k": {"file_name": "arpo_sft_54k.jsonl", **entry},
        "arpo_sft_toy": {"file_name": "arpo_sft_toy.jsonl", **entry},
    }
    assert _run(alpaca_file, out, toy_samples=10)[0]["skipped"] is True


def test_alpaca_registered_as_sharegpt_is_refused(tmp_path, alpaca_file):
    out = tmp_path / "out"
    with pytest.raises(SftjobsError) as err:
        _run(alpaca_file, out, expected_shape="sharegpt")
    message = str(err.value)
    assert "alpaca-shaped" in message and "as sharegpt" in message and "data.shape" in message
    assert list(out.iterdir()) == []


def test_sharegpt_registered_as_alpaca_is_refused(tmp_path, sharegpt_file):
    with pytest.raises(SftjobsError, match="sharegpt-shaped .* as alpaca"):
        _run(sharegpt_file, tmp_path / "out", expected_shape="alpaca")


def test_json_array_reader_across_tiny_chunks(tmp_path, monkeypatch):
    synth = ArpoSynth(seed=4, approx_bytes=600)
    records = [synth.sharegpt(i) for i in range(8)] + [
        {"x": '東京 — naïve \\u00e9 "q"'},
        [1, 2],
        "s",
        3,
        12345,
        -6.5e10,
        True,
        None,
    ]
    path = write_json_array(tmp_path / "a.json", records, indent=1)
    expected = json.loads(path.read_text(encoding="utf-8"))
    for chunk in (1, 3, 7, 64, 4096):
        monkeypatch.setattr(data_step, "CHUNK_BYTES", chunk)
        sha = hashlib.sha256()
        got = list(iter_records(path, sha))
        assert [r.value for r in got] == expected, chunk
        assert [r.index for r in got] == list(range(1, len(expected) + 1))
        assert sha.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    text = path.read_text(encoding="utf-8").splitlines()
    for rec in got:
        assert text[rec.line - 1].lstrip()[:1] in '{["31-tn', rec  # each reported line is where the record starts


@pytest.mark.parametrize(
    "text, match",
    [
        (
            '[{"instruction": "q", "output": "a"}, {"instruction": "q" "output": "a"}]',
            r"record 2 \(line 1\): not valid JSON",
        ),
        ('[{"instruction": "q", "output": "a"},\n {"instruction": "q", "out', r"record 2 \(line 2\)"),
        ('[{"instruction": "q", "output": "a"}\n', r"ends without '\]'"),
        ('[{"instruction": "q", "output": "a"} {"x": 1}]', r"expected ',' or '\]' after record 1"),
        ('[{"instruction": "q", "output": "a"}] trailing', r"unexpected data after the closing"),
    ],
)
def test_broken_json_array_is_a_clear_error(tmp_path, text, match):
    path = tmp_path / "a.json"
    path.write_text(text)
    with pytest.raises(SftjobsError, match=match):
        _run(path, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_jsonl_named_json_is_read_as_jsonl(tmp_path):
    synth = ArpoSynth(seed=5, approx_bytes=400)
    path = write_jsonl(tmp_path / "data.json", [synth.alpaca(i) for i in range(30)])
    report, _ = _run(path, tmp_path / "out")
    assert report["source"]["container"] == "jsonl" and report["valid"] == 30


# --------------------------------------------------------------------------------------------------
# validators and detection, one rule at a time


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"conversations": _turns(("human", "q"), ("gpt", "a")), "system": "s"}, None),
        ({"conversations": _turns(("human", "q"), ("gpt", "a"), ("human", "q"), ("gpt", "a"))}, None),
        ({"conversations": _turns(("human", "q"), ("gpt", "a")), "system": None}, None),
        ({"conversations": _turns(("system", "s"), ("human", "q"), ("gpt", "a"))}, None),
        (
            {"conversations": _turns(("system", "s"), ("human", "q"), ("gpt", "a")), "system": "t"},
            "both a 'system' key",
        ),
        ({"conversations": _turns(("system", "s"))}, "no human/gpt turns"),
        ({"conversations": _turns(("gpt", "a"), ("human", "q"))}, "turn 1 has role 'gpt', expected 'human'"),
        ({"conversations": _turns(("human", "q"), ("observation", "r"))}, "tool role 'observation'"),
        ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}, "turn 1 (human) has no string 'value'"),
        ({"conversations": [{"value": "q"}]}, "turn 1 has no 'from' key"),
        ({"conversations": ["q", "a"]}, "turn 1 is a str"),
        ({"conversations": "q"}, "'conversations' is a str"),
        ([1], "not a JSON object"),
    ],
)
def test_validate_sharegpt(record, reason):
    got = validate_sharegpt(record)
    assert got == reason if reason is None else reason in got


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"instruction": "q", "input": "", "output": "a", "system": "s"}, None),
        ({"instruction": "q", "output": "a"}, None),
        ({"instruction": "q", "output": ""}, "'output' is empty"),
        ({"instruction": "q", "output": "a", "input": 3}, "'input' is a int"),
        ({"instruction": "q", "output": "a", "history": [["q0", "a0"]]}, "history"),
        ({"output": "a"}, "missing key 'instruction'"),
    ],
)
def test_validate_alpaca(record, reason):
    got = validate_alpaca(record)
    assert got == reason if reason is None else reason in got


def test_detect_shape_by_majority_and_entries():
    synth = ArpoSynth(seed=6, approx_bytes=300)
    assert detect_shape([synth.sharegpt(i) for i in range(5)] + [synth.alpaca(9)]) == "sharegpt"
    assert detect_shape(["junk", synth.alpaca(1)]) == "alpaca"
    with pytest.raises(SftjobsError, match="none"):
        detect_shape([1, 2, 3])
    assert dataset_info_entry("f.jsonl", "sharegpt")["columns"] == {"messages": "conversations", "system": "system"}
    assert synth.sharegpt(1)["system"] == SYSTEM_PROMPT
    gpt = synth.sharegpt(1)["conversations"][1]["value"]
    assert "<think>" in gpt and "<result>" in gpt and "\\boxed{" in gpt


def test_json_array_lone_surrogate_is_kept_escaped(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"instruction": "q \\ud800", "output": "a \u00e9"}]', encoding="utf-8")
    report, _ = _run(path, tmp_path / "out")
    assert report["valid"] == 1
    line = (tmp_path / "out" / "arpo_sft_54k.jsonl").read_text(encoding="utf-8")
    assert "\\ud800" in line and json.loads(line)["instruction"] == "q \ud800"

"""The data step: fetch the SFT file, check every record, and register it for LLaMA-Factory.

Two shapes are accepted, because the plan mixed up two data sets (docs/upstream.md, "The data set"):
ARPO-SFT-54K is sharegpt (``conversations`` of human/gpt turns + ``system``), Tool-Star-SFT-54K is
alpaca (``instruction``/``input``/``output``). The step detects which one it got and says so, so a file
is never trained on under the wrong column mapping.

Files are read in one streaming pass (JSON Lines, or a top-level JSON array decoded incrementally), so
memory stays flat however large the file is; the source is hashed during that same pass.

Sharegpt rules (mirroring LLaMA-Factory's sharegpt converter, which otherwise drops or mis-pairs turns):
turns alternate human, gpt, human, gpt ... and end with gpt. One leading ``{"from": "system"}`` turn is
allowed, since LLaMA-Factory reads it as the system prompt; but not together with a top-level
``system`` key, because LLaMA-Factory would then silently ignore the key. A ``null`` system counts as
absent. Tool roles (function_call / observation) are rejected: ARPO keeps tool use inline in gpt turns.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import shlex
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Literal

from sftjobs import datasets
from sftjobs.errors import SftjobsError
from sftjobs.fsutil import SNIFF_BYTES, atomic_write_json, not_utf8_advice, sniff_not_utf8
from sftjobs.io.model_files import env_token

Shape = Literal["sharegpt", "alpaca"]
SHAPES: tuple[str, ...] = ("sharegpt", "alpaca")

REPORT_NAME = "data_report.json"
DATASET_INFO_NAME = "dataset_info.json"
REPORT_VERSION = 1

# A record bigger than this is a broken file (e.g. a whole JSON document on one "line"), and capping
# it keeps the streaming promise: memory never grows past a few records.
MAX_RECORD_BYTES = 64 << 20
CHUNK_BYTES = 1 << 20
SHAPE_SAMPLE = 64
MAX_BAD_EXAMPLES = 20
MAX_BAD_IN_MESSAGE = 5

_JSON_WS = re.compile(r"[ \t\n\r]*")
_NUMBER_CHARS = frozenset("0123456789.eE+-")
_OPENAI_ROLES = {"user", "assistant"}
_TOOL_ROLES = {"function_call", "observation", "tool"}

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------------
# Download


def download_data_file(repo_id: str, filename: str, local_dir: Path, revision: str | None = None) -> Path:
    """Download one file of a Hugging Face *dataset* repo into ``local_dir`` and return its path.

    The token is ``HF_TOKEN`` from the environment only (``env_token``); sftjobs never
    takes it as an argument, so it cannot end up in a rendered file or a log. ``HF_HUB_OFFLINE=1`` and
    ``HF_ENDPOINT`` are honoured by huggingface_hub.
    """
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import hf_hub_download

    local_dir = Path(local_dir)
    where = f"file {filename!r} of dataset {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    offline = hf_constants.is_offline_mode()  # HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read at import
    try:
        local_dir.mkdir(parents=True, exist_ok=True)
        path = hf_hub_download(
            repo_id=repo_id,
            filename=filename,
            repo_type="dataset",
            revision=revision,
            local_dir=local_dir,
            token=env_token(),
        )
    except hf_errors.GatedRepoError as exc:
        raise SftjobsError(
            f"Dataset {repo_id!r} is gated: accept its terms on the Hugging Face page with your account, "
            f"then export HF_TOKEN=<a token of that account> before running the data step ({_first_line(exc)})"
        ) from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise SftjobsError(
            f"Could not access dataset repo {repo_id!r} on the Hugging Face hub: it does not exist or is "
            f"private. Check data.hub_repo in the profile, or export HF_TOKEN if it is private "
            f"({_first_line(exc)})"
        ) from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise SftjobsError(
            f"Revision {revision!r} not found in dataset {repo_id!r}: fix data.revision in the profile "
            f"or leave it unset for the default branch ({_first_line(exc)})"
        ) from exc
    except hf_errors.EntryNotFoundError as exc:
        if isinstance(exc, hf_errors.LocalEntryNotFoundError):
            raise _offline_or_unreachable(where, local_dir, offline, exc) from exc
        raise SftjobsError(
            f"The {where} does not exist: check data.hub_file in the profile against the repo's file list "
            f"({_first_line(exc)})"
        ) from exc
    except hf_errors.LocalEntryNotFoundError as exc:
        raise _offline_or_unreachable(where, local_dir, offline, exc) from exc
    except hf_errors.HfHubHTTPError as exc:
        raise SftjobsError(
            f"The Hugging Face hub refused the download of the {where}: {_first_line(exc)}. "
            f"Retry later, or check HF_TOKEN and HF_ENDPOINT"
        ) from exc
    except OSError as exc:
        raise SftjobsError(
            f"Could not download the {where} into {local_dir}: {exc}. Check that the directory is "
            f"writable and has space, and that the hub (HF_ENDPOINT) is reachable from this machine"
        ) from exc
    return Path(path)


def _offline_or_unreachable(where: str, local_dir: Path, offline: bool, exc: Exception) -> SftjobsError:
    if offline:
        return SftjobsError(
            f"HF_HUB_OFFLINE is set and the {where} is not in {local_dir}. Unset HF_HUB_OFFLINE on a "
            f"machine that can reach the hub, or put the file there first (e.g. run the data step on a "
            f"login node)"
        )
    return SftjobsError(
        f"Could not reach the Hugging Face hub for the {where} and it is not in {local_dir}. Check the "
        f"network or HF_ENDPOINT, or download the file on a machine with access into {local_dir} "
        f"({_first_line(exc)})"
    )


def _first_line(exc: BaseException) -> str:
    """The hub's own words, on one line: huggingface_hub splits status and reason over several lines."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    text = text or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# --------------------------------------------------------------------------------------------------
# Streaming reader


@dataclass(slots=True)
class RawRecord:
    """One record as read: ``raw`` holds the original JSONL line (so it can be copied byte for byte),
    ``value`` the parsed JSON, ``error`` why it could not be parsed."""

    index: int  # 1-based position among the records
    line: int  # 1-based line of the file where the record starts
    value: Any = None
    raw: bytes | None = None
    error: str | None = None

    @property
    def where(self) -> str:
        return f"line {self.line}" if self.index == self.line else f"record {self.index} (line {self.line})"


def check_utf8_head(path: Path) -> None:
    """Refuse a file that is plainly not UTF-8 (UTF-16/32 with or without a byte-order mark, gzip, binary),
    saying what it is and how to convert it. Read line by line, a UTF-16 file would be half-read: its first
    line passes (json.loads guesses UTF-16 from bytes), a stray NUL counts as a record, and its raw bytes would
    be copied into the training file."""
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
    found = sniff_not_utf8(head)
    if found is not None:
        raise SftjobsError(not_utf8_advice(path, found, "data file", "point data.path or data.hub_file at the JSON "
                                                                   "Lines or JSON file itself"))


def sniff_container(path: Path) -> Literal["jsonl", "json-array"]:
    """A file whose first non-blank character is ``[`` is one JSON array; anything else is read as
    JSON Lines. Judged by content, not by extension: hub data sets often name JSON Lines ``.json``.
    A file that is not UTF-8 text is refused here (check_utf8_head)."""
    check_utf8_head(path)
    with open(path, "rb") as handle:
        while chunk := handle.read(65536):
            stripped = chunk.lstrip(codecs.BOM_UTF8).lstrip(b" \t\r\n")
            if stripped:
                return "json-array" if stripped[:1] == b"[" else "jsonl"
    return "jsonl"


def iter_records(path: Path, hasher: Any = None) -> Iterator[RawRecord]:
    """Yield every record of a JSON Lines file or a top-level JSON array, streaming.

    A broken JSON line is yielded with ``error`` set, so the caller can count it and go on. A syntax
    error inside a JSON array raises SftjobsError instead: the array cannot be resumed past it.
    ``hasher`` (a hashlib object) is fed every byte of the file as it is read.
    """
    path = Path(path)
    container = sniff_container(path)
    with open(path, "rb", buffering=max(CHUNK_BYTES, 1 << 16)) as handle:
        if container == "jsonl":
            yield from _iter_jsonl(path, handle, hasher)
        else:
            yield from _iter_json_array(path, handle, hasher)


def _iter_jsonl(path: Path, handle: BinaryIO, hasher: Any) -> Iterator[RawRecord]:
    line_no = 0
    index = 0
    while True:
        line = handle.readline(MAX_RECORD_BYTES + 1)
        if not line:
            return
        if hasher is not None:
            hasher.update(line)
        line_no += 1
        if len(line) > MAX_RECORD_BYTES and not line.endswith(b"\n"):
            raise SftjobsError(
                f"{path}: line {line_no} is longer than {MAX_RECORD_BYTES >> 20} MiB; this is not a JSON "
                f"Lines file of SFT records. Point data.hub_file or data.path at a JSON Lines file (one record "
                f"per line) or at a top-level JSON array"
            )
        body = line.rstrip(b"\r\n")
        if line_no == 1 and body.startswith(codecs.BOM_UTF8):
            body = body[len(codecs.BOM_UTF8) :]
        if not body.strip():
            continue  # blank lines (e.g. a trailing one) are not records
        index += 1
        try:
            # Decoded strictly first: json.loads(bytes) would guess UTF-16/32 and pass UTF-8-encoded surrogates,
            # and a line that parsed is copied byte for byte into the training file, which must be UTF-8.
            value = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield RawRecord(index, line_no, raw=body, error=f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
            continue
        except ValueError as exc:
            yield RawRecord(index, line_no, raw=body, error=f"not valid JSON: {_json_problem(exc)}")
            continue
        yield RawRecord(index, line_no, value=value, raw=body)


def _json_problem(exc: ValueError) -> str:
    """json's message with its column: "Unterminated string starting at column 9", not "... at at column 9"."""
    msg = getattr(exc, "msg", str(exc))
    col = getattr(exc, "colno", None)
    if not col:
        return msg
    return f"{msg} column {col}" if msg.endswith(" at") else f"{msg} at column {col}"


def _iter_json_array(path: Path, handle: BinaryIO, hasher: Any) -> Iterator[RawRecord]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    raw_decode = json.JSONDecoder().raw_decode
    buf = ""
    pos = 0
    eof = False
    line = 1  # line number at buf[counted]
    counted = 0
    offset = 0  # bytes read so far, for error messages

    def fill() -> None:
        nonlocal buf, pos, eof, line, counted, offset
        chunk = handle.read(CHUNK_BYTES)
        if hasher is not None and chunk:
            hasher.update(chunk)
        offset += len(chunk)
        eof = not chunk
        try:
            text = decoder.decode(chunk, final=eof)
        except UnicodeDecodeError as exc:
            raise SftjobsError(
                f"{path}: not valid UTF-8 near byte {offset - len(chunk) + exc.start}: re-encode the file as UTF-8"
            ) from exc
        # Drop what is consumed so the buffer holds at most one record plus one chunk.
        line += buf.count("\n", counted, pos)
        buf = buf[pos:] + text
        pos = 0
        counted = 0

    def skip_ws() -> None:
        nonlocal pos
        while True:
            pos = _JSON_WS.match(buf, pos).end()
            if pos < len(buf) or eof:
                return
            fill()

    def line_at(i: int) -> int:
        nonlocal line, counted
        line += buf.count("\n", counted, i)
        counted = i
        return line

    skip_ws()
    if pos >= len(buf) or buf[pos] != "[":
        raise SftjobsError(f"{path}: expected a JSON array starting with '['")
    pos += 1
    index = 0
    expect_value = True  # after '[' or ','
    first = True
    while True:
        skip_ws()
        if pos >= len(buf):
            raise SftjobsError(
                f"{path}: the JSON array ends without ']' after record {index} (line {line_at(pos)}); "
                f"the file is truncated: download it again"
            )
        ch = buf[pos]
        if not expect_value:
            if ch == ",":
                pos += 1
                expect_value = True
                continue
            if ch == "]":
                pos += 1
                break
            raise _array_syntax_error(
                path, index, line_at(pos), f"expected ',' or ']' after record {index}, found {ch!r}"
            )
        if ch == "]" and first:
            pos += 1
            break
        start_line = line_at(pos)
        while True:
            try:
                value, end = raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                incomplete = exc.pos >= len(buf) - 16 or exc.msg.startswith("Unterminated string")
                if eof or not incomplete:
                    what = exc.msg.removesuffix(" at").removesuffix(" starting")  # no position to point at here
                    raise _array_syntax_error(path, index + 1, start_line, f"not valid JSON: {what}") from exc
            else:
                # Only a number can parse "successfully" while cut short by the chunk edge ("12" of "123").
                if eof or type(value) not in (int, float) or (end < len(buf) and buf[end] not in _NUMBER_CHARS):
                    break
            if len(buf) - pos > MAX_RECORD_BYTES:
                raise SftjobsError(
                    f"{path}: record {index + 1} (line {start_line}) is larger than "
                    f"{MAX_RECORD_BYTES >> 20} MiB or never ends; the file is malformed"
                )
            fill()
            start_line = line_at(pos)
        index += 1
        yield RawRecord(index, start_line, value=value)
        pos = end
        expect_value = False
        first = False
    skip_ws()
    if pos < len(buf):
        raise _array_syntax_error(path, index, line_at(pos), "unexpected data after the closing ']'")


def _array_syntax_error(path: Path, index: int, line: int, what: str) -> SftjobsError:
    return SftjobsError(
        f"{path}: record {index} (line {line}): {what}. A JSON array cannot be read past a syntax "
        f"error; fix or re-download the file, or convert it to JSON Lines so broken records can be skipped"
    )


# --------------------------------------------------------------------------------------------------
# Shape detection and validation


def _shape_of(value: Any) -> str | None:
    if not isinstance(value, dict):
        return None
    if "conversations" in value:
        return "sharegpt"
    if "instruction" in value or "output" in value:
        return "alpaca"
    return None


def detect_shape(records: Iterable[Any]) -> Shape:
    """Decide sharegpt or alpaca from (the first ``SHAPE_SAMPLE``) parsed records, by majority."""
    votes = {"sharegpt": 0, "alpaca": 0}
    keys_seen: dict[str, None] = {}
    roles_seen: dict[str, None] = {}
    for n, value in enumerate(records):
        if n >= SHAPE_SAMPLE:
            break
        if isinstance(value, RawRecord):
            value = value.value
        if isinstance(value, dict):
            keys_seen.update(dict.fromkeys(value))
            shape = _shape_of(value)
            if shape:
                votes[shape] += 1
            if shape == "sharegpt" and isinstance(value["conversations"], list):
                for turn in value["conversations"]:
                    if isinstance(turn, dict):
                        roles_seen[str(turn.get("from", turn.get("role")))] = None
    keys = ", ".join(sorted(keys_seen)) or "none (no record was a JSON object)"
    if not votes["sharegpt"] and not votes["alpaca"]:
        hint = ""
        if "messages" in keys_seen:
            hint = (
                " The records have 'messages' (OpenAI chat format, role/content); convert them to "
                "sharegpt 'conversations' with from/value and human/gpt roles."
            )
        raise SftjobsError(
            f"Cannot tell the data set's shape: expected sharegpt records ({{'conversations': [{{'from': "
            f"'human'|'gpt', 'value': ...}}], 'system': ...}}) or alpaca records ('instruction', 'input', "
            f"'output'); the keys seen were: {keys}.{hint}"
        )
    shape: Shape = "sharegpt" if votes["sharegpt"] >= votes["alpaca"] else "alpaca"
    if shape == "sharegpt" and roles_seen and not (set(roles_seen) & {"human", "gpt"}):
        if set(roles_seen) & _OPENAI_ROLES:
            raise SftjobsError(
                f"The conversations use the roles {', '.join(sorted(roles_seen))} (OpenAI style); this "
                f"step expects ARPO's sharegpt roles 'human' and 'gpt' under 'from'/'value'. Convert the "
                f"roles (user -> human, assistant -> gpt) before using this file"
            )
    return shape


def validate_sharegpt(value: Any) -> str | None:
    """Return why ``value`` is not a usable sharegpt record, or None if it is."""
    if not isinstance(value, dict):
        return f"not a JSON object (a {type(value).__name__})"
    conv = value.get("conversations")
    if conv is None:
        return f"missing key 'conversations' (keys: {', '.join(sorted(value)) or 'none'})"
    if not isinstance(conv, list):
        return f"'conversations' is a {type(conv).__name__}, not a list"
    if not conv:
        return "'conversations' is empty"
    system = value.get("system")
    if system is not None and not isinstance(system, str):
        return f"'system' is a {type(system).__name__}, not a string"
    start = 0
    first = conv[0]
    if isinstance(first, dict) and first.get("from") == "system":
        if system:
            return "has both a 'system' key and a leading system turn; keep one"
        if not isinstance(first.get("value"), str) or not first["value"].strip():
            return "turn 1 (system) has an empty or non-string 'value'"
        start = 1
    turns = len(conv) - start
    if turns == 0:
        return "'conversations' has no human/gpt turns"
    for i in range(start, len(conv)):
        turn = conv[i]
        n = i + 1
        if not isinstance(turn, dict):
            return f"turn {n} is a {type(turn).__name__}, not an object"
        role = turn.get("from")
        if role is None:
            return f"turn {n} has no 'from' key (keys: {', '.join(sorted(turn)) or 'none'})"
        expected = "human" if (i - start) % 2 == 0 else "gpt"
        if role != expected:
            if role in _OPENAI_ROLES:
                return f"turn {n} has role {role!r} (OpenAI style); expected {expected!r}: use human/gpt"
            if role in _TOOL_ROLES:
                return f"turn {n} has tool role {role!r}; expected {expected!r} (tool use belongs inline in gpt turns)"
            return f"turn {n} has role {role!r}, expected {expected!r} (turns must alternate human, gpt)"
        text = turn.get("value")
        if not isinstance(text, str):
            return f"turn {n} ({role}) has no string 'value'"
        if not text.strip():
            return f"turn {n} ({role}) is empty"
    if turns % 2:
        return "the conversation ends with a human turn; it must end with gpt"
    return None


def validate_alpaca(value: Any) -> str | None:
    """Return why ``value`` is not a usable alpaca record, or None if it is."""
    if not isinstance(value, dict):
        return f"not a JSON object (a {type(value).__name__})"
    for key in ("instruction", "output"):
        if key not in value:
            return f"missing key {key!r} (keys: {', '.join(sorted(value)) or 'none'})"
        if not isinstance(value[key], str):
            return f"{key!r} is a {type(value[key]).__name__}, not a string"
        if not value[key].strip():
            return f"{key!r} is empty"
    for key in ("input", "system"):
        if value.get(key) is not None and not isinstance(value[key], str):
            return f"{key!r} is a {type(value[key]).__name__}, not a string"
    if value.get("history"):
        return "has a multi-turn 'history', which the alpaca mapping here does not read; use sharegpt"
    return None


VALIDATORS: dict[str, Callable[[Any], str | None]] = {"sharegpt": validate_sharegpt, "alpaca": validate_alpaca}


def dataset_info_entry(file_name: str, shape: str) -> dict[str, Any]:
    """The LLaMA-Factory dataset_info.json entry for a JSONL file of the given shape."""
    if shape == "sharegpt":
        return {
            "file_name": file_name,
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "system": "system"},
        }
    if shape == "alpaca":
        return {
            "file_name": file_name,
            "formatting": "alpaca",
            "columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system"},
        }
    raise ValueError(f"unknown shape {shape!r}")


# --------------------------------------------------------------------------------------------------
# The step


@dataclass
class _Output:
    """A JSONL file being written to a temp name beside its final one, hashed as it is written."""

    final: Path
    tmp: Path = field(init=False)
    rows: int = 0
    size: int = 0

    def __post_init__(self) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.final.name}.", suffix=".tmp", dir=self.final.parent)
        self.tmp = Path(tmp)
        self._handle = os.fdopen(fd, "wb", buffering=CHUNK_BYTES)
        self._sha = hashlib.sha256()

    def write(self, line: bytes) -> None:
        self._handle.write(line)
        self._sha.update(line)
        self.rows += 1
        self.size += len(line)

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            os.chmod(self.tmp, 0o644)

    def discard(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        self.tmp.unlink(missing_ok=True)

    def summary(self) -> dict[str, Any]:
        return {"file_name": self.final.name, "rows": self.rows, "bytes": self.size, "sha256": self._sha.hexdigest()}


def prepare_data(
    source: Path,
    out_dir: Path,
    *,
    toy_samples: int,
    max_bad_fraction: float,
    full_name: str = datasets.FULL,
    toy_name: str = datasets.TOY,
    expected_shape: str | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Validate ``source`` and write the full and toy JSONL files, dataset_info.json and data_report.json.

    One streaming pass. Nothing is replaced unless the whole pass succeeds and the bad fraction is
    within ``max_bad_fraction``. Returns the report, with ``skipped`` True when an earlier identical
    run's outputs were found intact and nothing was done.
    """
    source = Path(source)
    out_dir = Path(out_dir)
    if expected_shape == "auto":  # the profile's spelling of "detect it"
        expected_shape = None
    _check_params(source, toy_samples, max_bad_fraction, full_name, toy_name, expected_shape)
    params = {
        "toy_samples": toy_samples,
        "max_bad_fraction": max_bad_fraction,
        "full_name": full_name,
        "toy_name": toy_name,
        "expected_shape": expected_shape,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped = _try_skip(source, out_dir, params, log)
    if skipped is not None:
        return skipped

    started = time.monotonic()
    stat = source.stat()
    source_sha = hashlib.sha256()
    container = sniff_container(source)
    full = _Output(out_dir / f"{full_name}.jsonl")
    toy: _Output | None = None
    try:
        toy = _Output(out_dir / f"{toy_name}.jsonl")
        counts = _stream(source, container, source_sha, full, toy, toy_samples, expected_shape, log)
        full.close()
        toy.close()
        shape, rows, bad, bad_examples = counts
        valid = rows - bad
        _log_bad(bad_examples, bad, rows, max_bad_fraction, log)
        if valid == 0 or bad / rows > max_bad_fraction:
            raise _too_many_bad(source, container, rows, bad, bad_examples, max_bad_fraction)
        if toy.rows < toy_samples:
            log(f"note: only {toy.rows} valid records, fewer than data.toy_samples={toy_samples}; the toy set has all")
        report = {
            "report_version": REPORT_VERSION,
            "source": {
                "path": str(source.resolve()),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "sha256": source_sha.hexdigest(),
                "container": container,
            },
            "shape": shape,
            "rows_read": rows,
            "valid": valid,
            "bad": bad,
            "bad_fraction": bad / rows,
            "bad_examples": bad_examples,
            "outputs": {full_name: full.summary(), toy_name: toy.summary()},
            "params": params,
            "seconds": round(time.monotonic() - started, 3),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        # The report goes first and comes back last: a crash in between leaves no report, so the
        # next run redoes the work instead of trusting half-replaced outputs.
        (out_dir / REPORT_NAME).unlink(missing_ok=True)
        os.replace(full.tmp, full.final)
        os.replace(toy.tmp, toy.final)
    except BaseException:
        full.discard()
        if toy is not None:
            toy.discard()
        raise
    _write_dataset_info(out_dir, shape, full_name, toy_name)
    atomic_write_json(out_dir / REPORT_NAME, report)
    log(
        f"data: {valid} valid of {rows} records ({bad} bad) -> {full.final.name} ({full.rows} rows), "
        f"{toy.final.name} ({toy.rows} rows), {DATASET_INFO_NAME} in {out_dir}"
    )
    return {**report, "skipped": False}


def _check_params(
    source: Path, toy_samples: int, max_bad_fraction: float, full_name: str, toy_name: str, expected_shape: str | None
) -> None:
    if source.is_dir():
        raise SftjobsError(
            f"Data file {source} is a directory, not a file: point data.path at the JSON Lines or JSON file in it"
        )
    if not source.exists():
        raise SftjobsError(f"Data file {source} does not exist: run the download first, or fix data.path")
    if not source.is_file():
        raise SftjobsError(
            f"Data file {source} is not a regular file (a device, FIFO or socket): copy the data into a file and "
            f"point data.path at it"
        )
    if not (0.0 <= max_bad_fraction <= 1.0):
        raise SftjobsError(f"data.max_bad_fraction must be between 0 and 1, got {max_bad_fraction}")
    if toy_samples < 1:
        raise SftjobsError(f"data.toy_samples must be at least 1, got {toy_samples}")
    for key, name in (("full", full_name), ("toy", toy_name)):
        if not name or "/" in name or name.startswith("."):
            raise SftjobsError(f"The {key} data set name {name!r} must be a plain file name (no '/', not hidden)")
    if full_name == toy_name:
        raise SftjobsError(f"The full and toy data set names are both {full_name!r}; give them different names")
    if expected_shape is not None and expected_shape not in SHAPES:
        raise SftjobsError(f"Unknown data.shape {expected_shape!r}: use one of {', '.join(SHAPES)} or auto")


def _stream(
    source: Path,
    container: str,
    hasher: Any,
    full: _Output,
    toy: _Output,
    toy_samples: int,
    expected_shape: str | None,
    log: Log,
) -> tuple[Shape, int, int, list[dict[str, Any]]]:
    records = iter_records(source, hasher)
    # The shape is judged on the first few records; they are held back (a bounded number) and then
    # processed like the rest, so the file is still read once.
    head: list[RawRecord] = []
    for rec in records:
        head.append(rec)
        if len(head) >= SHAPE_SAMPLE:
            break
    if not head:
        raise SftjobsError(
            f"Data file {source} has no records (it is empty): download it again, or point data.hub_file or "
            f"data.path at the SFT file"
        )
    parsed = [r.value for r in head if r.error is None]
    if not parsed:
        listed = "; ".join(f"{r.where}: {r.error}" for r in head[:MAX_BAD_IN_MESSAGE])
        raise SftjobsError(
            f"Cannot read {source}: none of its first {len(head)} records is valid JSON ({listed}). Expected "
            f"JSON Lines (one object per line) or one top-level JSON array; download the file again or "
            f"point data.hub_file or data.path at the SFT file.{_legacy_encoding_hint(source, [r.error for r in head])}"
        )
    shape = detect_shape(parsed)
    if expected_shape is not None and shape != expected_shape:
        raise SftjobsError(
            f"{source} holds {shape}-shaped records ({_shape_words(shape)}) but the profile registers it "
            f"as {expected_shape} (data.shape); training on it would mis-parse every row. Point data.hub_file "
            f"(or data.path) at a {expected_shape} file, or set data.shape to {shape} or auto if this is the "
            f"file you meant"
        )
    log(f"detected {shape} shape in {source.name} ({container}; {_shape_words(shape)})")
    validate = VALIDATORS[shape]
    rows = bad = 0
    bad_examples: list[dict[str, Any]] = []
    as_jsonl = container == "jsonl"
    for chain in (head, records):
        for rec in chain:
            rows += 1
            reason = rec.error or validate(rec.value)
            if reason is not None:
                bad += 1
                if len(bad_examples) < MAX_BAD_EXAMPLES:
                    bad_examples.append({"line": rec.line, "record": rec.index, "reason": reason})
                continue
            # A JSONL line that parsed is copied as it was: no re-serialising cost, no drift.
            line = rec.raw + b"\n" if as_jsonl else _jsonl_line(rec.value)
            full.write(line)
            if toy.rows < toy_samples:
                toy.write(line)
    return shape, rows, bad, bad_examples


def _jsonl_line(value: Any) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=False).encode() + b"\n"
    except UnicodeEncodeError:
        # A lone surrogate ("\\ud800" in the source) has no UTF-8 form; keep it escaped, as the source had it.
        return json.dumps(value).encode() + b"\n"


def _shape_words(shape: str) -> str:
    return "conversations of human/gpt turns" if shape == "sharegpt" else "instruction/input/output"


def _where(example: dict[str, Any]) -> str:
    if example["line"] == example["record"]:
        return f"line {example['line']}"
    return f"record {example['record']} (line {example['line']})"


def _log_bad(bad_examples: list[dict[str, Any]], bad: int, rows: int, limit: float, log: Log) -> None:
    if not bad:
        log(f"all {rows} records are valid")
        return
    for example in bad_examples:
        log(f"bad record at {_where(example)}: {example['reason']}")
    if bad > len(bad_examples):
        log(f"... and {bad - len(bad_examples)} more bad records")
    log(f"{bad} bad of {rows} records ({bad / rows:.2%}); data.max_bad_fraction allows {limit:.2%}")


def _legacy_encoding_hint(source: Path, reasons: list[str]) -> str:
    if not any(r.startswith("not valid UTF-8") for r in reasons):
        return ""
    converted = source.with_name(source.stem + ".utf8" + source.suffix)
    return (
        f" Lines that are not UTF-8 usually mean a legacy encoding: if the file is Latin-1 or Windows-1252, convert "
        f"it, e.g. `iconv -f LATIN1 -t UTF-8 {shlex.quote(str(source))} > {shlex.quote(str(converted))}`."
    )


def _too_many_bad(
    source: Path, container: str, rows: int, bad: int, examples: list[dict[str, Any]], limit: float
) -> SftjobsError:
    listed = "; ".join(f"{_where(e)}: {e['reason']}" for e in examples[:MAX_BAD_IN_MESSAGE])
    hint = _legacy_encoding_hint(source, [e["reason"] for e in examples])
    if bad == rows and container == "jsonl":
        hint += (
            " No record could be used; if the file is one JSON document rather than JSON Lines or a "
            "top-level array, convert it."
        )
    return SftjobsError(
        f"{source}: {bad} of {rows} records are bad ({bad / rows:.2%}), more than data.max_bad_fraction="
        f"{limit} allows. First bad: {listed}.{hint} Fix or re-download the file, or raise "
        f"data.max_bad_fraction in the profile if dropping these records is acceptable. No output was written"
    )


def _write_dataset_info(out_dir: Path, shape: str, full_name: str, toy_name: str) -> None:
    """Add (or refresh) our two entries, keeping any others already registered in the file."""
    path = out_dir / DATASET_INFO_NAME
    info: dict[str, Any] = {}
    if path.exists():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise SftjobsError(f"{path} is not valid JSON ({exc}); delete it and run the data step again") from exc
        if not isinstance(info, dict):
            raise SftjobsError(f"{path} is not a JSON object; delete it and run the data step again")
    wanted = {
        full_name: dataset_info_entry(f"{full_name}.jsonl", shape),
        toy_name: dataset_info_entry(f"{toy_name}.jsonl", shape),
    }
    if all(info.get(k) == v for k, v in wanted.items()):
        return
    info.update(wanted)
    atomic_write_json(path, info)


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            sha.update(chunk)
    return sha.hexdigest()


def _try_skip(source: Path, out_dir: Path, params: dict[str, Any], log: Log) -> dict[str, Any] | None:
    """Return the earlier report if that run's inputs and outputs are provably unchanged, else None."""
    path = out_dir / REPORT_NAME
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        recorded = report["source"]
        outputs = report["outputs"]
        if report.get("report_version") != REPORT_VERSION or report.get("params") != params:
            return None
        # Cheap checks first: a size change means a new file without reading a byte of it.
        if source.stat().st_size != recorded["size"]:
            return None
        for out in outputs.values():
            if (out_dir / out["file_name"]).stat().st_size != out["bytes"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if _sha256_file(source) != recorded["sha256"]:
        return None
    for out in outputs.values():
        if _sha256_file(out_dir / out["file_name"]) != out["sha256"]:
            return None
    _write_dataset_info(out_dir, report["shape"], params["full_name"], params["toy_name"])
    log(
        f"data: {source.name} is unchanged (sha256 {recorded['sha256'][:12]}) and its outputs in {out_dir} "
        f"are intact; nothing to do"
    )
    return {**report, "skipped": True}

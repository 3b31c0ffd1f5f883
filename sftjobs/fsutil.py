"""Atomic file writes: a reader never sees a half-written file, a crash never leaves one."""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = 0o644, durable: bool = True) -> Path:
    """Write ``text`` to a temp file beside ``path``, fsync it (unless ``durable`` is False, for caches that
    can be rebuilt), then rename it over ``path``: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_json(path: str | os.PathLike, data: Any, mode: int = 0o644, durable: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n", mode=mode, durable=durable)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# The first bytes of a file that is not UTF-8 text, and how to say so. JSON and YAML text starts with ASCII
# (a brace, a bracket, a key, a comment), so in UTF-16 every other byte of the head is NUL and in UTF-32 three
# of every four (RFC 4627's detection); a byte-order mark names the encoding outright.
_BOMS = (  # UTF-32 first: its little-endian mark begins with UTF-16's
    (b"\xff\xfe\x00\x00", "UTF-32 (little-endian, with a byte-order mark)", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32 (big-endian, with a byte-order mark)", "UTF-32"),
    (b"\xff\xfe", "UTF-16 (little-endian, with a byte-order mark)", "UTF-16"),
    (b"\xfe\xff", "UTF-16 (big-endian, with a byte-order mark)", "UTF-16"),
)
SNIFF_BYTES = 4096


def sniff_not_utf8(head: bytes) -> tuple[str, str | None] | None:
    """What a file starting with ``head`` is when it is plainly not UTF-8 text: (description, the encoding
    name iconv takes to convert it, or None when it is not text at all); None when it may be UTF-8."""
    for bom, what, iconv in _BOMS:
        if head.startswith(bom):
            return what, iconv
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed", None
    if b"\x00" not in head:
        return None
    zeros = [0, 0, 0, 0]
    counts = [0, 0, 0, 0]
    for i, byte in enumerate(head[: len(head) - len(head) % 4]):
        counts[i % 4] += 1
        zeros[i % 4] += byte == 0
    share = [z / c if c else 0.0 for z, c in zip(zeros, counts, strict=True)]
    if min(share[1:]) > 0.9 and share[0] < 0.5:
        return "UTF-32 (little-endian, no byte-order mark)", "UTF-32LE"
    if min(share[:3]) > 0.9 and share[3] < 0.5:
        return "UTF-32 (big-endian, no byte-order mark)", "UTF-32BE"
    even, odd = (share[0] + share[2]) / 2, (share[1] + share[3]) / 2
    if odd > 0.3 and even < odd / 4:  # JSON's keys and punctuation are ASCII: NUL in every high byte
        return "UTF-16 (little-endian, no byte-order mark)", "UTF-16LE"
    if even > 0.3 and odd < even / 4:
        return "UTF-16 (big-endian, no byte-order mark)", "UTF-16BE"
    # A stray NUL in a text file is one bad line, judged with the others; a head full of control bytes is not text.
    control = sum(1 for byte in head if byte < 32 and byte not in (9, 10, 13) or byte == 127)
    if control > len(head) * 0.05:
        return "binary (it holds NUL and other control bytes)", None
    return None


def not_utf8_advice(path: str | os.PathLike, found: tuple[str, str | None], what: str, otherwise: str) -> str:
    """``path is <encoding>, not UTF-8 text: <how to convert it>`` for an error message; ``otherwise`` is the
    advice for a file that is not text at all."""
    import shlex

    description, iconv = found
    path = Path(path)
    converted = path.with_name(f"{path.stem}.utf8{path.suffix}")
    if iconv is not None:
        how = (f"convert it, e.g. `iconv -f {iconv} -t UTF-8 {shlex.quote(str(path))} > "
               f"{shlex.quote(str(converted))}`, and use the converted file")
    elif description.startswith("gzip"):
        name = path.name[:-3] if path.name.endswith(".gz") and len(path.name) > 3 else path.name + ".decompressed"
        converted = path.with_name(name)
        how = f"decompress it first, e.g. `gunzip -c {shlex.quote(str(path))} > {shlex.quote(str(converted))}`"
    else:
        how = otherwise
    return f"{path} is {description}, not UTF-8 text; sftjobs reads a {what} as UTF-8 only: {how}"


@contextmanager
def exclusive_lock(path: str | os.PathLike, blocking: bool = True) -> Iterator[int | None]:
    """Hold an exclusive flock on ``path`` (a file, created if missing, or an existing directory) for the with-block;
    the kernel releases it when the holder exits or dies, so a crash leaves no stale lock. Non-blocking: yields
    None when someone else holds it."""
    path = Path(path)
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


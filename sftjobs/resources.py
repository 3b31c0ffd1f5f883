"""Where the shipped templates/ and configs/ live, from a checkout or from an installed wheel."""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent


def shipped_dir(kind: str) -> Path:
    """``kind`` is "templates" or "configs": the checkout's top-level folder, else the wheel's data files."""
    candidates = [
        _CHECKOUT / kind,
        Path(sysconfig.get_path("data")) / "share" / "sftjobs" / kind,
        Path(sys.prefix) / "share" / "sftjobs" / kind,
    ]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"sftjobs is installed without its {kind}/ folder (looked in {candidates})")

"""The Python environment a run uses: library versions, read from package metadata (nothing is imported).

submit records them in the manifest; preflight compares the node's with them.
"""

from __future__ import annotations

import platform

PACKAGES = ("torch", "transformers", "deepspeed", "llamafactory", "accelerate")


def library_versions() -> dict[str, str | None]:
    """Installed versions (metadata only: nothing is imported) plus python's."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions

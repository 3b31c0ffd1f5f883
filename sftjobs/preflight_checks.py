"""Mistakes caught on the submitting machine before anything is queued (issue 19.10): a local model or data path
that does not exist, and a LLaMA-Factory template name that LLaMA-Factory does not know."""

from __future__ import annotations

import ast
import difflib
import importlib.util
from functools import lru_cache
from pathlib import Path

from sftjobs.errors import SftjobsError
from sftjobs.planning.paths import absolute
from sftjobs.profile import Profile


def check_before_queueing(profile: Profile, base: Path) -> None:
    where = profile.source + (f" (with --set {' '.join(profile.overrides)})" if profile.overrides else "")
    model, data = profile.values["model"], profile.values["data"]
    if model["source"] == "path":
        path = Path(absolute(model["path"], base))
        if not path.is_dir():
            what = "is a file, not a model directory" if path.exists() else "does not exist"
            raise SftjobsError(f"{where}: model.path {model['path']!r} ({path}) {what}. Give the folder of a local "
                               "model (config.json and weights), or use model.source hub with model.hub_id.")
    if data["source"] == "path":
        path = Path(absolute(data["path"], base))
        if not path.is_file():
            what = "is a folder, not a file" if path.exists() else "does not exist"
            raise SftjobsError(f"{where}: data.path {data['path']!r} ({path}) {what}. Give a JSONL or JSON file, "
                               "or use data.source hub with data.hub_repo and data.hub_file.")
    template = profile.values["train"].get("template")
    known = llamafactory_templates()
    if isinstance(template, str) and known and template not in known:
        close = difflib.get_close_matches(template, sorted(known), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise SftjobsError(f"{where}: train.template {template!r} is not a LLaMA-Factory template{hint}. "
                           f"The installed LLaMA-Factory knows {len(known)}, e.g. qwen, llama3, mistral "
                           "(llamafactory/data/template.py).")


@lru_cache(maxsize=1)
def llamafactory_templates() -> frozenset[str]:
    """The names LLaMA-Factory's template registry holds: the register_template(name=...) calls of the installed
    llamafactory/data/template.py, read without importing it (that would import torch, seconds on a login node).
    Empty where llamafactory is not installed or its file has another shape: then nothing is checked."""
    try:
        spec = importlib.util.find_spec("llamafactory")
    except (ImportError, ValueError):
        return frozenset()
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    source = Path(next(iter(spec.submodule_search_locations))) / "data" / "template.py"
    try:
        tree = ast.parse(source.read_text())
    except (OSError, SyntaxError, ValueError):
        return frozenset()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register_template":
            args = [k.value for k in node.keywords if k.arg == "name"] + node.args[:1]
            if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
                names.add(args[0].value)
    return frozenset(names)

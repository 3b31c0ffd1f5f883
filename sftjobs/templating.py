"""The one Jinja2 environment every rendered text comes from (templates/, StrictUndefined, shell and YAML quoting)."""

from __future__ import annotations

import shlex
from typing import Any

import jinja2
import yaml

from sftjobs.resources import shipped_dir


def _yaml_scalar(value: Any) -> str:
    """One YAML value on one line, quoted when YAML would misread it (e.g. "yes", "1e-5", ": ")."""
    text = yaml.safe_dump({"k": value}, default_flow_style=True, width=1 << 30, allow_unicode=True).strip()
    return text[len("{k: "):-1]


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(shipped_dir("templates"))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["sh"] = lambda v: shlex.quote(str(v))
    env.filters["yaml"] = _yaml_scalar
    return env


def render_template(name: str, **context: Any) -> str:
    return _environment().get_template(name).render(**context)

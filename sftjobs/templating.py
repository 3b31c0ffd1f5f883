"""The one Jinja2 environment every rendered text comes from (templates/, StrictUndefined, shell and YAML quoting)."""

from __future__ import annotations

import shlex
from typing import Any

import jinja2
import yaml

from sftjobs.errors import SftjobsError
from sftjobs.resources import shipped_dir


class _OneLineDumper(yaml.SafeDumper):
    """safe_dump, except that a string holding a line break or another unprintable character is written
    double-quoted with escapes: PyYAML would otherwise write it single-quoted over several lines (a newline as a
    blank line, NEL and U+2028 raw), which a one-line ``key: value`` template cannot hold."""


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    plain = data.isprintable() and not any(c in data for c in "\x85\u2028\u2029\ufeff")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=None if plain else '"')


_OneLineDumper.add_representer(str, _represent_str)


def yaml_scalar(value: Any) -> str:
    """One YAML value on one line, quoted when YAML would misread it (e.g. "yes", "1e-5", ": ", a newline)."""
    text = yaml.dump({"k": value}, Dumper=_OneLineDumper, default_flow_style=True, width=1 << 30,
                     allow_unicode=True).strip()
    text = text[len("{k: "):-1]
    if "\n" in text or "\r" in text:  # pragma: no cover - the representer above prevents it
        raise SftjobsError(f"cannot write {value!r} as one YAML line; this is a bug in sftjobs' renderer")
    return text


def _comment(value: Any) -> str:
    """Text inside a ``#`` comment of a rendered file: one printable line, or a refusal (never a new line of
    shell or YAML). Profile names are checked when loaded (profile.PROFILE_NAME); this guards every other caller."""
    text = str(value)
    if not text.isprintable() or any(c in text for c in "\x85\u2028\u2029"):
        raise SftjobsError(f"{text!r} cannot go into a comment of a rendered file: it holds a line break or another "
                           "control character")
    return text


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(shipped_dir("templates"))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["sh"] = lambda v: shlex.quote(str(v))
    env.filters["yaml"] = yaml_scalar
    env.filters["comment"] = _comment
    return env


def render_template(name: str, **context: Any) -> str:
    return _environment().get_template(name).render(**context)

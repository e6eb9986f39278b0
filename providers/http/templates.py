"""The template language of the ``http`` provider's calls: ``{placeholders}`` in paths,
queries, JSON bodies and ``"Name: value"`` headers, and dotted paths into a JSON answer.

Placeholders are ``{secrets.NAME}`` (a value from ``[providers.NAME.secrets]``, the provider's
headers only), ``{vars.NAME}`` (``[credentials.params.vars]``), ``{key_name}`` and
``{rotation_id}`` (create), ``{key_id}`` (revoke) and ``{key}`` (the key itself, verify headers
only, so that no secret is ever part of a URL or body that a proxy or the service might log);
``{{`` and ``}}`` are literal braces. :func:`check_template` is what lets ``rotator check``
report a misspelt placeholder with its file and line. Messages quote the offending placeholder,
never the template: it might hold a pasted key.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = [
    "IDENT",
    "MissingVar",
    "check_json_path",
    "check_template",
    "json_at",
    "json_strings",
    "parse_header",
    "render",
    "render_json",
    "shown",
    "template_placeholders",
    "vars_used",
]

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
"""A ``vars`` or ``secrets`` name."""
_SCOPED = re.compile(r"(vars|secrets)\.([A-Za-z_][A-Za-z0-9_]*)")
_FIXED = ("key", "key_id", "key_name", "rotation_id", "start", "end", "start_unix",
          "end_unix", "start_date", "end_date", "width")
_USAGE = "usage"
_WHERE_ALLOWED = {
    "key": "verify headers",
    "secrets": "the provider's headers",
    "key_id": "revoke and usage",
    "key_name": "create",
    "rotation_id": "create",
    **{name: _USAGE for name in ("start", "end", "start_unix", "end_unix", "start_date",
                                 "end_date", "width")},
}
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_JSON_PATH = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*")


class MissingVar(Exception):
    """A template used ``{vars.NAME}`` that the credential's params do not define."""


def shown(text: str) -> str:
    """``text`` cut to 40 characters, for quoting a name from the policy file."""
    return text if len(text) <= 40 else text[:37] + "..."


def template_placeholders(template: str) -> list[str]:
    """The placeholders of ``template``; ``ValueError`` for a brace that opens nothing.

    Messages quote the offending placeholder, never the template (it might hold a pasted key).
    """
    found = []
    for match in _TOKEN.finditer(template):
        if match.group(0) in ("{{", "}}"):
            continue
        if match.group(1) is None:
            raise ValueError(f'a lone "{match.group(0)}" in a template: placeholders look like '
                             "{vars.NAME}; write {{ or }} for a literal brace")
        found.append(match.group(1))
    return found


def check_template(template: str, allowed: frozenset[str], secrets: set[str] | None) -> None:
    """Raise ``ValueError`` naming each unknown placeholder and what is allowed here."""
    for name in template_placeholders(template):
        scoped = _SCOPED.fullmatch(name)
        kind = scoped.group(1) if scoped else name
        if kind in allowed and (kind in _FIXED or scoped):
            if kind == "secrets" and secrets is not None and scoped.group(2) not in secrets:
                defined = ", ".join(sorted(secrets)) or "none"
                raise ValueError(f"{{{name}}} names no secret of [providers.NAME.secrets] "
                                 f"(defined: {defined})")
            continue
        if kind in _WHERE_ALLOWED and (kind in _FIXED or scoped):
            raise ValueError(f"{{{name}}} is not allowed here: it may appear only in "
                             f"{_WHERE_ALLOWED[kind]}")
        raise ValueError(f"unknown placeholder {{{shown(name)}}}{_suggest(name, allowed)}; "
                         f"placeholders here: {_known(allowed)}")


def _known(allowed: frozenset[str]) -> str:
    order = ["secrets", "vars", *_FIXED]
    return ", ".join("{" + (f"{k}.NAME" if k in ("vars", "secrets") else k) + "}"
                     for k in order if k in allowed)


def _suggest(name: str, allowed: frozenset[str]) -> str:
    _, dot, tail = name.partition(".")
    if dot and IDENT.fullmatch(tail) and "vars" in allowed:
        return f" (did you mean {{vars.{tail}}}?)"
    close = difflib.get_close_matches(name, [k for k in _FIXED if k in allowed], n=1)
    return f" (did you mean {{{close[0]}}}?)" if close else ""


def vars_used(template: str) -> list[str]:
    """The NAME of each ``{vars.NAME}`` in ``template`` (checked already), in order."""
    return [scoped.group(2) for name in template_placeholders(template)
            if (scoped := _SCOPED.fullmatch(name)) and scoped.group(1) == "vars"]


def render(template: str, values: Mapping[str, str],
           encode: Callable[[str], str] | None = None) -> str:
    """``template`` with each placeholder replaced by its value (``encode``d if given)."""
    def substitute(match: re.Match[str]) -> str:
        text = match.group(0)
        if text in ("{{", "}}"):
            return text[0]
        name = match.group(1)
        if name not in values:
            raise MissingVar(name)
        return encode(values[name]) if encode else values[name]

    return _TOKEN.sub(substitute, template)


def render_json(node: Any, values: Mapping[str, str]) -> Any:
    """A JSON template with every key and string value rendered."""
    if isinstance(node, str):
        return render(node, values)
    if isinstance(node, dict):
        return {render(k, values): render_json(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [render_json(v, values) for v in node]
    return node


def json_strings(node: Any, where: str = "body") -> Iterator[tuple[str, str]]:
    """``(where, text)`` for every key and string value of a JSON template."""
    if isinstance(node, str):
        yield where, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield f"{where}.{key}", key
            yield from json_strings(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from json_strings(value, f"{where}[{index}]")


def json_at(document: Any, path: str) -> Any:
    """The value at dotted ``path`` (``result.id``, ``data.0.id``); ``""`` is the document.
    ``LookupError`` if absent."""
    node = document
    for part in path.split(".") if path else ():
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise LookupError(path)
    return node


def check_json_path(value: str, what: str, empty_ok: bool = False) -> str:
    """``value`` if it is a dotted path :func:`json_at` can follow, else ``ValueError``."""
    if (value == "" and empty_ok) or _JSON_PATH.fullmatch(value):
        return value
    raise ValueError(f'{what} is a dotted path into the JSON answer, like "result.id" or '
                     '"data.0.id"' + (' ("" for the answer itself)' if empty_ok else ""))


def parse_header(line: str) -> tuple[str, str]:
    """``(name, value template)`` of a ``"Name: value"`` header line."""
    name, colon, value = line.partition(":")
    if not colon or not _HEADER_NAME.fullmatch(name.strip()):
        raise ValueError('each header is one string "Name: value", like '
                         '"Authorization: Bearer {secrets.admin}"')
    return name.strip(), value.strip()

"""A griffe extension: polyak's docstrings are written for Sphinx (reST roles, ``.. math::``,
``::`` literal blocks); mkdocstrings renders Markdown. This rewrites the reST pieces the
docstrings use into their Markdown equivalents before mkdocstrings parses them:

- ``:math:`x``` becomes ``$x$`` and a ``.. math::`` block a ``$$ ... $$`` block (arithmatex);
- ``:class:`polyak.EMA``` and the other cross-reference roles become inline code (a leading ``~``
  dropped), since a name the API pages do not render would break ``mkdocs build --strict``;
- a paragraph ending in ``::`` ends in ``:`` (the indented block below it is code in both);
- a reST "simple table" (columns under ``====  ====`` rules) becomes a Markdown table.

Only the docs site runs this; the docstrings themselves stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_ROLE = re.compile(r":(?:py:)?(math|class|func|meth|attr|data|mod|obj|exc|const):`([^`]+)`")
_MATH = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)$")
_RULE = re.compile(r"^\s*=+(\s+=+)+\s*$")


def _role(match: re.Match[str]) -> str:
    role, text = match.group(1), match.group(2)
    if role == "math":
        return f"${text}$"
    return f"`{text.lstrip('~')}`"


def _math_blocks(lines: list[str]) -> list[str]:
    """``.. math:: a`` plus the lines indented below it -> ``$$``, the formula, ``$$``; a blank
    line inside the directive starts another equation (another ``$$`` block)."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        found = _MATH.match(lines[i])
        if not found:
            out.append(lines[i])
            i += 1
            continue
        indent = found.group("indent")
        first = found.group("first").strip()
        equations: list[list[str]] = [[first] if first else []]
        i += 1
        while i < len(lines):
            line = lines[i]
            if line.strip():
                if not line.startswith(indent + " ") or len(line) - len(line.lstrip()) <= len(
                    indent
                ):
                    break
                equations[-1].append(line.strip())
            else:  # a blank line: the directive goes on only if an indented line follows
                following = next((x for x in lines[i + 1 :] if x.strip()), "")
                if not following.startswith(indent + " "):
                    break
                if equations[-1]:
                    equations.append([])
            i += 1
        for k, body in enumerate(e for e in equations if e):
            if k:
                out.append("")
            out += [f"{indent}$$", *(f"{indent}{line}" for line in body), f"{indent}$$"]
    return out


def _cells(line: str, starts: list[int]) -> list[str]:
    bounds = [*starts[1:], None]
    return [line[a:b].strip() for a, b in zip(starts, bounds, strict=True)]


def _simple_tables(lines: list[str]) -> list[str]:
    """A reST simple table (rule, header, rule, rows, rule) -> a Markdown table."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not (_RULE.match(lines[i]) and i + 2 < len(lines) and _RULE.match(lines[i + 2])):
            out.append(lines[i])
            i += 1
            continue
        rule = lines[i]
        indent = rule[: len(rule) - len(rule.lstrip())]
        starts = [m.start() for m in re.finditer(r"=+", rule)]
        rows = [_cells(lines[i + 1], starts)]
        i += 3
        while i < len(lines) and not _RULE.match(lines[i]):
            if lines[i].strip():
                rows.append(_cells(lines[i], starts))
            i += 1
        i += 1  # the closing rule
        out.append(indent + "| " + " | ".join(rows[0]) + " |")
        out.append(indent + "|" + "---|" * len(starts))
        out += [indent + "| " + " | ".join(r) + " |" for r in rows[1:]]
    return out


def to_markdown(text: str) -> str:
    """The docstring ``text`` with its reST constructs rewritten as Markdown."""
    lines = _simple_tables(_math_blocks(text.splitlines()))
    text = "\n".join(lines)
    text = _ROLE.sub(_role, text)
    return re.sub(r"(\S)::[ \t]*$", r"\1:", text, flags=re.M)


class RstDocstrings(Extension):
    """Rewrite every docstring of the loaded objects (see the module docstring)."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)

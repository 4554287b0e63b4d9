"""A griffe extension (loaded by mkdocstrings, see mkdocs.yml) that renders kopt's docstrings.

kopt's docstrings are Google style with a few reStructuredText habits (``.. math::``,
``:math:``, ``:func:`` roles, an ``Example:`` heading). This rewrites those into what
mkdocstrings renders: an ``Examples:`` section (so ``>>>`` lines become code), ``$$ ... $$`` and
``$...$`` for pymdownx.arithmatex, and inline code for cross-reference roles. The source
docstrings are not changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`~?([^`]+)`")
_INLINE_MATH = re.compile(r":math:`([^`]+)`")
_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:\s*$")
_MATH_DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*(.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def rst_to_markdown(text: str) -> str:
    """The docstring ``text`` with kopt's reST constructs rewritten as Markdown."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        heading = _EXAMPLE_HEADING.match(line)
        directive = _MATH_DIRECTIVE.match(line)
        if heading:
            out.append(f"{heading.group(1)}Examples:")
            i += 1
        elif directive:
            pad, first = directive.group(1), directive.group(2).strip()
            body = [first] if first else []
            i += 1
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(pad)):
                if lines[i].strip():
                    body.append(lines[i].strip())
                i += 1
            out += [f"{pad}$$", f"{pad}{' '.join(body)}", f"{pad}$$", ""]
        else:
            line = _INLINE_MATH.sub(lambda m: f"${m.group(1)}$", line)
            out.append(_ROLE.sub(lambda m: f"`{m.group(1)}`", line))
            i += 1
    return "\n".join(out)


class RstDocstrings(griffe.Extension):
    """Rewrites every docstring before mkdocstrings parses it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)

"""MkDocs hooks (see ``hooks:`` in mkdocs.yml).

The performance page shows ``benchmarks/RESULTS.md`` (written by ``benchmarks/run.py
--output benchmarks/RESULTS.md``) when that file exists, and says how to produce it otherwise.
"""

from __future__ import annotations

from pathlib import Path

RESULTS_MARKER = "<!-- benchmarks/RESULTS.md -->"


def _demote_headings(markdown: str, levels: int) -> str:
    """Adds ``levels`` to every ATX heading outside fenced code blocks."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out)


def on_page_markdown(markdown, page, config, files, **kwargs):
    if RESULTS_MARKER not in markdown:
        return markdown
    results = Path(config["config_file_path"]).parent / "benchmarks" / "RESULTS.md"
    if results.is_file():
        body = (
            "The report below is `benchmarks/RESULTS.md` as committed with this version; its "
            "header says which machine and versions produced it.\n\n"
            + _demote_headings(results.read_text(encoding="utf-8"), 2)
        )
    else:
        body = (
            "No `benchmarks/RESULTS.md` is committed with this version. Produce one on your own "
            "machine with `python benchmarks/run.py --output benchmarks/RESULTS.md` (a few "
            "minutes) and rebuild these docs to see it here."
        )
    return markdown.replace(RESULTS_MARKER, body)

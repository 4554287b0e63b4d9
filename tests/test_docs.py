"""The documentation: the site builds without warnings, and its Python examples run."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
# Blocks of other libraries' code (the tf.keras side of a comparison) are not run.
NOT_KOPT = re.compile(r"\btf\.|import tensorflow|^\s*import keras|^\s*from keras", re.MULTILINE)
COMMENT = re.compile(r"#.*$", re.MULTILINE)


def python_blocks(page: Path) -> list[str]:
    blocks = []
    for match in FENCE.finditer(page.read_text(encoding="utf-8")):
        body = textwrap.dedent(match.group("body"))
        if not NOT_KOPT.search(COMMENT.sub("", body)):
            blocks.append(body)
    return blocks


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason="mkdocs is not installed (pip install .[docs])",
)
def test_mkdocs_build_is_strict_clean(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "WARNING" not in log, log
    site = tmp_path / "site"
    assert (site / "index.html").is_file()
    assert (site / "img" / "schedules_gallery.png").is_file()
    reference = (site / "reference" / "kopt" / "index.html").read_text(encoding="utf-8")
    assert 'id="kopt.adam"' in reference  # the API reference was generated from docstrings


RUNNER = """
import json, sys, traceback
failures = []
for page, blocks in json.load(sys.stdin).items():
    namespace = {"__name__": "docs_example"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{page} (example {i + 1})", "exec"), namespace)
        except Exception:
            failures.append(f"{page}, example {i + 1}:\\n{traceback.format_exc()}")
            break
print("\\n".join(failures), file=sys.stderr)
sys.exit(1 if failures else 0)
"""


def test_python_examples_in_the_docs_run():
    """Every Python block of each page, in order, in one namespace per page.

    They run in a fresh interpreter on one CPU device (not under this suite's simulated
    devices), as a reader would run them.
    """
    pages = {str(p.relative_to(ROOT)): python_blocks(p) for p in PAGES}
    pages = {page: blocks for page, blocks in pages.items() if blocks}
    assert len(pages) >= 8, sorted(pages)
    env = dict(os.environ, MPLBACKEND="Agg")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(pages),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr


def test_readme_opens_with_the_two_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```\w*\n(.*?)```", readme, re.DOTALL).group(1)
    assert first_block.strip().splitlines() == ["make demo", "make test"]
    assert readme.index("## Quick start") < readme.index("```")


def test_the_building_block_table_spells_each_signature_as_the_code_does():
    """docs/gradient-transformers.md named the wrapped argument of accumulate_gradients and
    apply_if_finite `inner`, where the functions (and API.md) call it `transformation`, so
    the documented keyword raised a TypeError."""
    import inspect

    import kopt

    page = (ROOT / "docs" / "gradient-transformers.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)\(([^)]*)\)` \|", page, re.MULTILINE)
    assert len(rows) >= 10
    for name, arguments in rows:
        written = [a.split("=")[0].strip() for a in arguments.split(",") if a.strip()]
        parameters = inspect.signature(getattr(kopt, name)).parameters.values()
        actual = []
        for p in parameters:
            if p.kind is p.KEYWORD_ONLY and "*" not in actual:
                actual.append("*")
            actual.append(p.name)
        assert written == actual, f"{name}: the docs write {written}, the code has {actual}"

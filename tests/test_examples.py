"""Runs every script in examples/ at a tiny size, in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# script -> whether it writes a PNG (given with --out)
SCRIPTS = {
    "quickstart.py": True,
    "custom_optimizer.py": False,
    "composing_transforms.py": False,
    "flax_linen.py": False,
    "equinox_mlp.py": False,
    "packed_params.py": False,
    "schedules_gallery.py": True,
}
# Options beyond --steps that keep a script small: packed_params.py's 24-block model takes most
# of its run compiling; 4 blocks (20 parameter arrays) train packed and unpacked all the same.
SMALL = {"packed_params.py": ["--depth", "4"]}
TESTED_ELSEWHERE = {"data_parallel.py"}  # tests/test_data_parallel.py runs it in two processes


def run_example(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg")
    env.pop("XLA_FLAGS", None)  # conftest simulates 4 devices; run the examples as users do
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_example_is_covered():
    found = {p.name for p in EXAMPLES.glob("*.py")}
    assert found - TESTED_ELSEWHERE == set(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_runs(script, tmp_path):
    args = ["--steps", "5", *SMALL.get(script, [])]
    png = tmp_path / f"{Path(script).stem}.png"
    if SCRIPTS[script]:
        args += ["--out", str(png)]
    result = run_example(script, *args)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), f"{script} printed nothing"
    if SCRIPTS[script]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{script} wrote no PNG at {png}"
        assert str(png) in result.stdout
    if script == "quickstart.py":
        rows = [line.split("  ")[0] for line in result.stdout.splitlines()]
        for name in ("SGD momentum", "Adam", "AdamW", "RMSprop", "Adagrad", "Lion"):
            assert name in rows, f"quickstart's table has no row for {name}"

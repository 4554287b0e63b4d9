"""examples/data_parallel.py: two local processes train data-parallel over JAX's distributed
runtime (gloo collectives on the CPU) and end with identical parameters."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "data_parallel.py"


def test_two_processes_train_to_identical_parameters():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the children set their own
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--num-processes", "2", "--steps", "20", "--timeout", "150"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "parameters identical on every process" in result.stdout, output[-4000:]
    for pid in (0, 1):
        assert f"[process {pid}] functional: loss" in result.stdout
        assert f"[process {pid}] facade: loss" in result.stdout

"""examples/data_parallel.py: two local processes train data-parallel over JAX's distributed
runtime (gloo collectives on the CPU) and end with identical parameters; and
tests/multiprocess_worker.py checks the facade's ``PerReplica`` gradients across processes."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "data_parallel.py"
WORKER = Path(__file__).resolve().parent / "multiprocess_worker.py"


def example_module():
    spec = importlib.util.spec_from_file_location("data_parallel_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_per_replica_of_one_process_is_refused_and_a_global_one_is_summed():
    """A ``PerReplica`` from ``pmap`` in one of two processes holds only that process's
    replicas: ``apply_gradients`` refuses it, naming the variable, and changes nothing (it
    failed inside ``jax.device_put`` before); one array of both processes' replicas is summed
    (see the worker)."""
    example = example_module()
    port = example.free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    children = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [child.communicate(timeout=120)[0] for child in children]
    finally:
        example.stop(children)
    for i, (child, output) in enumerate(zip(children, outputs, strict=True)):
        assert child.returncode == 0, output[-4000:]
        assert f"process {i}: ok" in output, output[-4000:]

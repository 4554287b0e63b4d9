"""Where XLA:CPU loses Adam's bandwidth, measured: a one-pass Adam kernel called from JAX.

    python benchmarks/one_pass.py                                  # 10M params, a few minutes
    python benchmarks/one_pass.py --quick                          # smoke test: small sizes
    python benchmarks/one_pass.py --output benchmarks/RESULTS.md   # its own block there

XLA:CPU compiles a jitted Adam step, kopt's and optax's alike, to three loops: one writes
``m``, one ``v``, and the third reads the param and the new ``m`` and ``v`` back to write the
param. That moves 40 bytes per float32 parameter where one pass moves 28, and XLA:CPU has no
switch to merge the loops (``RESULTS.md`` lists what was tried). torch's fused CPU Adam makes
one pass.

This experiment asks what a single pass is worth when called from JAX. It compiles
``native/one_pass_adam.cc`` (Keras's Adam maths, the same as ``kopt.adam``, in one C++ loop split
over the cores) with the machine's C++ compiler (``$CXX``, else ``c++``, ``g++`` or ``clang++``)
against the running jaxlib's XLA FFI headers. It registers the loop as a custom call
(``jax.ffi.ffi_call``) and calls it from a jitted step, with the param, ``m`` and ``v`` donated
and updated in place. The step's numbers are checked against ``kopt.adam`` first; a mismatch
fails the script. Then it is timed in pairs (``harness.paired_rounds``) against kopt's jitted
pure step and against torch's fused Adam, where torch imports.

The kernel is part of this benchmark, not of kopt: shipping it would mean a compiled extension
per platform and jaxlib. It would also only pay where the optimizer owns the whole step (a
transformation that returns updates for ``apply_updates`` cannot write the params in the same
pass).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import contenders  # noqa: E402
import harness  # noqa: E402
import run  # noqa: E402
from contenders import ADAM, Unavailable  # noqa: E402
from harness import Budget, Row  # noqa: E402

SOURCE = HERE / "native" / "one_pass_adam.cc"
TARGET = "kopt_bench_one_pass_adam"
FULL_SIZE = 10_000_000
QUICK_SIZE = 200_000
QUICK_BUDGET = Budget(seconds=0.15, min_reps=3, max_reps=200, warmup=1)
_KERNEL: list = []  # the jitted step's custom call, once compiled and registered


def compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise Unavailable("no C++ compiler found (set CXX)")


def kernel():
    """``ffi_call``'s function for the compiled kernel (compiled and registered on first use)."""
    if _KERNEL:
        return _KERNEL[0]
    import jax

    library = Path(tempfile.mkdtemp(prefix="kopt-one-pass-")) / "one_pass_adam.so"
    command = [
        compiler(),
        "-O3",
        "-march=native",
        "-fno-math-errno",  # lets sqrt vectorise
        "-fopenmp-simd",
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-w",
        f"-I{jax.ffi.include_dir()}",
        str(SOURCE),
        "-o",
        str(library),
        "-lpthread",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise Unavailable(f"the kernel did not compile: {done.stderr.strip()[-500:]}")
    handler = ctypes.cdll.LoadLibrary(str(library)).KoptBenchOnePassAdam
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    _KERNEL.append(handler)
    return handler


def one_pass_step():
    """``(p, m, v, t, g) -> (p, m, v, t)``: one Adam step through the kernel, jitted, with
    ``p``, ``m``, ``v`` and ``t`` donated (the kernel updates the first three in place)."""
    import jax
    import jax.numpy as jnp

    kernel()
    b1, b2, eps = 0.9, 0.999, ADAM["epsilon"]

    def step(p, m, v, t, g):
        t = t + 1
        # Keras's bias correction folded into the learning rate, as kopt.adam computes it.
        power = t.astype(jnp.float32)
        lr_t = ADAM["learning_rate"] * jnp.sqrt(1 - b2**power) / (1 - b1**power)
        hyper = jnp.stack([lr_t, *(jnp.float32(x) for x in (b1, b2, eps))])
        out = jax.ShapeDtypeStruct(p.shape, jnp.float32)
        call = jax.ffi.ffi_call(TARGET, (out, out, out), input_output_aliases={1: 0, 3: 1, 4: 2})
        p, m, v = call(hyper, p, g, m, v)
        return p, m, v, t

    return jax.jit(step, donate_argnums=(0, 1, 2, 3))


def build_one_pass(n_params: int) -> harness.Step:
    import jax.numpy as jnp

    fn = one_pass_step()
    (p,) = harness.numpy_leaves(n_params, 1, 0)
    (g,) = harness.numpy_leaves(n_params, 1, 1)
    box = [jnp.asarray(p), jnp.zeros(n_params), jnp.zeros(n_params), jnp.int32(0)]
    grads = jnp.asarray(g)

    def step():
        box[:] = fn(*box, grads)
        box[0].block_until_ready()

    step()
    return step


def check_against_kopt(n_params: int, steps: int = 3) -> float:
    """Runs ``steps`` steps of the kernel and of ``kopt.adam`` from the same params and
    gradients; returns the largest difference of the params (AssertionError past float32
    rounding)."""
    import jax.numpy as jnp
    import numpy as np

    import kopt

    (p0,) = harness.numpy_leaves(n_params, 1, 0)
    (g0,) = harness.numpy_leaves(n_params, 1, 1)
    g = jnp.asarray(g0)
    fn = one_pass_step()
    box = [jnp.asarray(p0), jnp.zeros(n_params), jnp.zeros(n_params), jnp.int32(0)]
    tx = kopt.adam(**ADAM)
    params = jnp.asarray(p0)
    state = tx.init(params)
    for _ in range(steps):
        box[:] = fn(*box, g)
        updates, state = tx.update(g, state, params)
        params = kopt.apply_updates(params, updates)
    got, want = np.asarray(box[0]), np.asarray(params)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not np.array_equal(want, p0)  # the steps moved the params
    return float(np.max(np.abs(got - want)))


def report(args: argparse.Namespace) -> str:
    n = QUICK_SIZE if args.quick else FULL_SIZE
    budget = QUICK_BUDGET if args.quick else run.FULL_BUDGET
    size = (n, 1)
    notes: list[str] = []
    rows: list[Row | None] = []
    try:
        difference = check_against_kopt(n)
        checked = (
            f"Before timing, three steps of the kernel matched three of `kopt.adam` from the "
            f"same params and gradients to {difference:.1e} (largest difference of a param)."
        )
    except Unavailable as e:
        checked = f"The kernel could not be built here: {e}."
    contenders_ = {
        "one-pass custom call": lambda: build_one_pass(n),
        "kopt": lambda: contenders.kopt_pure("adam", n, 1),
        "torch fused": lambda: contenders.torch_fused("adam", n, 1),
    }
    for a, b in (
        ("one-pass custom call", "kopt"),
        ("one-pass custom call", "torch fused"),
        ("kopt", "torch fused"),
    ):
        rows.append(
            run.timed_row(
                "one-pass", "adam", size, (a, contenders_[a]), (b, contenders_[b]), budget, notes
            )
        )
    machine = harness.machine_description()
    bandwidth = harness.inplace_bandwidth(n, budget)
    machine["in-place bandwidth"] = (
        f"{bandwidth:.1f} GB/s (jitted, donated `a + b` on float32, 12 bytes per element)"
    )
    command = "python benchmarks/one_pass.py" + (" --quick" if args.quick else "")
    parts = [
        *harness.report_header("# CPU: Adam in one pass, called from JAX", command, machine),
        "A jitted step calling `benchmarks/native/one_pass_adam.cc` through `jax.ffi.ffi_call` "
        "(Keras's Adam in one loop over the param, gradient, `m` and `v`, split over the "
        "cores, updating the donated buffers in place) against kopt's jitted, donated pure step "
        "(three loops, as XLA:CPU compiles it) and torch's fused Adam. Times are medians per "
        "step in ms; *A/B* is the median of per-iteration ratios of A and B timed alternately, "
        "as in the CPU report; *A GB/s* counts the 28 bytes an in-place "
        "step must move per param. " + checked,
        "",
        harness.rows_table([r for r in rows if r is not None], bandwidth),
    ]
    if notes:
        parts += ["", *[f"- {note}" for note in notes]]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small size, few repetitions")
    parser.add_argument("--output", type=Path, help="write the report into this file's block")
    args = parser.parse_args(argv)
    text = report(args)
    print(text)
    if args.output is not None:
        harness.write_block(args.output, "one-pass", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

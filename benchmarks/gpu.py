"""kopt's GPU benchmark: one script, run on a machine with a CUDA GPU, reported as Markdown.

    python benchmarks/gpu.py --output benchmarks/RESULTS.md   # replaces the GPU block there
    python benchmarks/gpu.py --quick                           # small sizes (runs on a CPU too)
    python benchmarks/gpu.py --train --output benchmarks/RESULTS.md  # the training-step block
    python benchmarks/gpu.py --all --output benchmarks/RESULTS.md    # both, one process

On an H200 the main report took 7 minutes and the training steps 5 (2026-11-27). Where the
machine is lent for a fixed time, ``--max-minutes M`` stops each report starting rows after M
minutes and names the rows left out; ``--optimizers adam`` keeps the report to Adam (the
sections that time Adam alone run only when it is chosen).

What it measures, each as paired A/B timings (the same machinery as ``run.py``):

- the card's in-place bandwidth: a jitted, donated ``a + b`` over 100M float32 (12 bytes per
  element), next to the card's specified peak where the device name is known;
- kopt's jitted, donated pure step against optax's, for Adam, SGD with momentum, RMSprop and
  Adagrad, with 100M params in 1, 200 and 1,000 leaves and 1M params in 100 leaves, with the
  bandwidth each reaches (bytes an in-place step must move over its median time);
- many leaves against one leaf: kopt's step over 100M params in 200 or 1,000 leaves (as they
  are, with ``kopt.flatten``, and with ``kopt.pack(max_leaf_size=None)``) against the same
  100M params in one leaf (same bytes, so the ratio is the per-byte cost of leaves);
- a few large leaves (100M params in 10): every leaf packed (``kopt.flatten``, whose step
  concatenates the gradient, and ``kopt.pack``, whose gradient comes packed) against loose,
  which is what packing everything costs where there are few arrays to save;
- kopt against torch.optim's fused Adam and SGD on the same card, where torch with CUDA is
  installed;
- the facade's ``apply_gradients`` against kopt's pure step.

``--train`` measures instead whole jitted training steps of an MLP (loss, gradient, Adam
update; ``contenders.mlp_params``): optax and kopt over loose params against ``kopt.pack``
with ``max_leaf_size=16384`` (its default off GPUs: large kernels stay loose) and with
``max_leaf_size=None`` (its default for params on a GPU: every param in one buffer, the
model's matrix products reading slices of it). It goes into
its own block of the output file.

Arrays are made on the device (``jax.random``, ``torch.randn``) so that building 100M-param
contenders takes no host time. JAX's preallocation is turned off so torch can share the card.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import contenders  # noqa: E402
import harness  # noqa: E402
import run  # noqa: E402
from contenders import Unavailable  # noqa: E402
from harness import Budget, Row  # noqa: E402

OPTIMIZERS = ("adam", "sgd_momentum", "rmsprop", "adagrad")
FULL_SIZES = ((100_000_000, 1), (100_000_000, 200), (100_000_000, 1000), (1_000_000, 100))
QUICK_SIZES = ((1_000_000, 1), (1_000_000, 20), (1_000_000, 100), (10_000, 10))
FULL_BUDGET = Budget(seconds=0.8, min_reps=10, max_reps=500, warmup=3, rounds=2)
QUICK_BUDGET = Budget(seconds=0.1, min_reps=3, max_reps=100, warmup=1)
BLOCK = "gpu"
TRAIN_BLOCK = "gpu-train"
FEW_LEAVES = 10
TRAIN_SIZES = ((100_000_000, 200), (10_000_000, 1000), (1_000_000, 100))
QUICK_TRAIN_SIZES = ((200_000, 20), (20_000, 10))
TRAIN_BUDGET = Budget(seconds=0.6, min_reps=5, max_reps=200, warmup=2)

# Specified memory bandwidth (GB/s) by the words of the device's name, for the share of peak.
SPEC_GBPS = {
    "H100 80GB HBM3": 3350,
    "H100 PCIe": 2000,
    "H100 NVL": 3900,
    "H200": 4800,
    "A100-SXM4-80GB": 2039,
    "A100-SXM4-40GB": 1555,
    "A100-PCIE-40GB": 1555,
    "A100 80GB PCIe": 1935,
    "L40S": 864,
    "L40": 864,
    "L4": 300,
    "A10G": 600,
    "T4": 320,
}


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[\s_-]+", name.upper()) if w]


def optimizer_names(text: str) -> tuple[str, ...]:
    """``--optimizers``: known names only, refused before any device time is spent."""
    names = tuple(x for x in text.split(",") if x)
    unknown = [x for x in names if x not in OPTIMIZERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer(s) {unknown or text!r}; choose from {', '.join(OPTIMIZERS)}"
        )
    return names


def spec_gbps(device_kind: str) -> float | None:
    """The specified bandwidth of the card whose name holds a key's words, whole and in order
    (``L4`` is not ``L40S``, ``H200`` not ``GH200``); the longest key that fits."""
    words = _words(device_kind)
    best = None
    for fragment, gbps in SPEC_GBPS.items():
        key = _words(fragment)
        fits = any(words[i : i + len(key)] == key for i in range(len(words) - len(key) + 1))
        if fits and (best is None or len(key) > best[0]):
            best = (len(key), gbps)
    return None if best is None else best[1]


def device_leaves(n_params: int, n_leaves: int, seed: int) -> list:
    """``n_leaves`` float32 vectors of ``n_params`` values in all, made on the default device."""
    import jax
    import numpy as np

    size = n_params // n_leaves
    sizes = [size + n_params - size * n_leaves] + [size] * (n_leaves - 1)
    whole = jax.random.normal(jax.random.key(seed), (n_params,), jax.numpy.float32)
    if n_leaves == 1:
        return [whole]
    parts = jax.jit(lambda x: tuple(jax.numpy.split(x, np.cumsum(sizes)[:-1])))(whole)
    del whole
    return list(parts)


def device_tree(n_params: int, n_leaves: int, seed: int) -> dict:
    leaves = device_leaves(n_params, n_leaves, seed)
    return {harness.leaf_name(i): x for i, x in enumerate(leaves)}


# Steps per timed unit: a training loop dispatches steps back to back and waits only now and
# then, so each timed unit runs REPEAT steps and waits once (set by --repeat).
REPEAT = [10]
# --max-minutes: when a report stops starting rows (time.monotonic()), or None for no limit.
# A leased machine's time is counted; a report cut short keeps the rows it measured.
DEADLINE: list[float | None] = [None]


def kopt_pure(
    optimizer: str, n_params: int, n_leaves: int, flat: bool = False, pack: bool = False
) -> harness.Step:
    import kopt

    tx = contenders.kopt_transformation(optimizer)
    if flat:
        # Every leaf packed: on a GPU a leaf is a kernel launch, whatever its size.
        tx = kopt.flatten(tx, max_leaf_size=n_params)
    params = device_tree(n_params, n_leaves, 0)
    grads = device_tree(n_params, n_leaves, 1)
    if pack:  # params, gradients and slots in one buffer (as jax.grad of a packed loss gives)
        params = kopt.pack(params, max_leaf_size=None)
        grads = kopt.pack(grads, max_leaf_size=None)
    return contenders.pure_step(tx, kopt.apply_updates, params, grads, REPEAT[0])


def optax_pure(optimizer: str, n_params: int, n_leaves: int) -> harness.Step:
    import optax

    tx = contenders.optax_transformation(optimizer)
    params = device_tree(n_params, n_leaves, 0)
    return contenders.pure_step(
        tx, optax.apply_updates, params, device_tree(n_params, n_leaves, 1), REPEAT[0]
    )


def kopt_facade(
    optimizer: str, n_params: int, n_leaves: int, loss_scale: bool = False
) -> harness.Step:
    """The facade's ``apply_gradients``; inside a dynamic ``LossScaleOptimizer`` with
    ``loss_scale`` (the gradients are finite)."""
    import kopt
    from kopt import optimizers

    variables = [kopt.Variable(x) for x in device_leaves(n_params, n_leaves, 0)]
    grads = device_leaves(n_params, n_leaves, 1)
    opt = contenders._keras_like(optimizers, optimizer)
    if loss_scale:
        opt = optimizers.LossScaleOptimizer(opt)

    def step():
        for _ in range(REPEAT[0]):
            opt.apply_gradients(zip(grads, variables, strict=True))
        opt.iterations.value.block_until_ready()

    step()
    return step


def train_step(library: str, n_params: int, n_leaves: int) -> harness.Step:
    """REPEAT jitted, donated Adam training steps of ``contenders.mlp_params``'s MLP, one wait.

    ``library``: ``"optax"``, ``"kopt"``, ``"kopt.pack"`` (leaves of at most 16,384 elements
    packed, the default off GPUs) or ``"kopt.pack(None)"`` (every param packed, the default for
    params on a GPU)."""
    size = None if library == "kopt.pack(None)" else 16384
    name = "kopt.pack" if library.startswith("kopt.pack") else library
    return contenders.train_step(
        name, "adam", n_params, n_leaves, repeat=REPEAT[0], max_leaf_size=size
    )


def torch_fused_cuda(optimizer: str, n_params: int, n_leaves: int) -> harness.Step:
    """torch.optim's fused Adam or SGD over CUDA tensors (its fastest GPU implementation)."""
    try:
        import torch
    except ImportError as e:
        raise Unavailable("torch is not installed") from e
    if not torch.cuda.is_available():
        raise Unavailable("torch sees no CUDA device")
    size = n_params // n_leaves
    sizes = [size + n_params - size * n_leaves] + [size] * (n_leaves - 1)
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen)) for s in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=gen)
    if optimizer == "adam":
        a = contenders.ADAM
        opt = torch.optim.Adam(params, lr=a["learning_rate"], eps=a["epsilon"], fused=True)
    elif optimizer == "sgd_momentum":
        s = contenders.SGD_MOMENTUM
        opt = torch.optim.SGD(params, lr=s["learning_rate"], momentum=s["momentum"], fused=True)
    else:
        raise Unavailable(f"no fused torch {optimizer}")

    def step():
        with torch.no_grad():
            for _ in range(REPEAT[0]):
                opt.step()
        torch.cuda.synchronize()

    step()
    return step


def timed(
    rows: list[Row],
    notes: list[str],
    suite: str,
    optimizer: str,
    size: tuple[int, int],
    a: tuple[str, Callable[[], harness.Step]],
    b: tuple[str, Callable[[], harness.Step]],
    budget: Budget,
    target: float | None = None,
) -> None:
    """``run.timed_row`` for contenders that run REPEAT steps a call; kept rows go to ``rows``.
    Past the report's ``--max-minutes`` the row is not started, and a note names it."""
    if DEADLINE[0] is not None and time.monotonic() > DEADLINE[0]:
        where = f"{optimizer}, {harness.format_size(size[0])} params in {size[1]} leaves"
        notes.append(f"not measured: {a[0]} vs {b[0]} ({where}), past --max-minutes")
        print(f"  skipped {a[0]} vs {b[0]}, {where}: past --max-minutes", file=sys.stderr)
        return
    row = run.timed_row(
        suite, optimizer, size, a, b, budget, notes, target=target, steps_per_call=REPEAT[0]
    )
    if row is not None:
        rows.append(row)


def use_compilation_cache() -> None:
    import atexit
    import shutil
    import tempfile

    import jax

    if jax.config.jax_compilation_cache_dir:  # set already (an earlier report of --all)
        return

    # Contenders are rebuilt every round: let identical programs come from the compilation
    # cache instead of compiling again (1,000-leaf steps take seconds to compile on a GPU).
    cache_dir = tempfile.mkdtemp(prefix="kopt-bench-")
    atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def device_rows(machine: dict) -> tuple[dict, float | None]:
    """The machine table's device rows; returns the table and the specified GB/s, if known."""
    import jax

    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    machine["device"] = f"{kind} ({device.platform}, {jax.device_count()} device(s))"
    spec = spec_gbps(kind)
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,clocks.max.memory", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if smi.returncode == 0 and smi.stdout.strip():
            machine["nvidia-smi (driver, max memory clock)"] = smi.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return machine, spec


def report_header(title: str, mode: str, args: argparse.Namespace, machine: dict) -> list[str]:
    """A report's first lines (:func:`harness.report_header`), with the command line (``mode``:
    the flag choosing the report, or "")."""
    command = " ".join(
        ["python benchmarks/gpu.py"]
        + ([mode] if mode else [])
        + (["--quick"] if args.quick else [])
        + ([f"--optimizers {','.join(args.optimizers)}"] if args.optimizers != OPTIMIZERS else [])
        + ([f"--repeat {REPEAT[0]}"] if REPEAT[0] != 10 else [])
        + ([f"--max-minutes {args.max_minutes:g}"] if args.max_minutes is not None else [])
    )
    return harness.report_header(title, command, machine)


def train_report(args: argparse.Namespace) -> str:
    """The ``--train`` report: whole training steps, optax and loose kopt against packed kopt."""
    use_compilation_cache()
    sizes = QUICK_TRAIN_SIZES if args.quick else TRAIN_SIZES
    budget = QUICK_BUDGET if args.quick else TRAIN_BUDGET
    machine, _ = device_rows(harness.machine_description())
    notes: list[str] = []
    rows: list[Row] = []
    for size in sizes:
        n, k = size
        for library in ("kopt", "kopt.pack", "kopt.pack(None)"):
            timed(
                rows,
                notes,
                "train",
                "adam",
                size,
                (library, lambda lib=library, n=n, k=k: train_step(lib, n, k)),
                ("optax", lambda n=n, k=k: train_step("optax", n, k)),
                budget,
            )
    parts = [
        *report_header("# GPU: whole training steps", "--train", args, machine),
        "One jitted, donated Adam training step (loss, gradient, update) of an MLP of square "
        "tanh layers (`contenders.mlp_params`: the leaves are the layers' kernels and biases), "
        f"batch 64, timed in units of {REPEAT[0]} steps with one wait; times are medians per "
        "step in ms. *kopt.pack* packs the leaves of at most 16,384 elements (`kopt.pack`'s "
        "default off GPUs), *kopt.pack(None)* packs every leaf (its default for params on a "
        "GPU), so the matrix products read slices of one buffer.",
        "",
        harness.markdown_table(
            ["params", "leaves", "A", "B", "A ms", "B ms", "A/B", "A/B IQR", "reps"],
            [
                [
                    harness.format_size(r.n_params),
                    str(r.n_leaves),
                    r.a_name,
                    r.b_name,
                    f"{r.timing.a_ms:.3f}",
                    f"{r.timing.b_ms:.3f}",
                    f"{r.timing.ratio:.2f}",
                    f"{r.timing.ratio_q1:.2f}–{r.timing.ratio_q3:.2f}",
                    str(r.timing.reps),
                ]
                for r in rows
            ],
        ),
    ]
    if notes:
        parts += [""] + [f"- {n}" for n in notes]
    return "\n".join(parts) + "\n"


def report(args: argparse.Namespace) -> str:
    use_compilation_cache()
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    budget = QUICK_BUDGET if args.quick else FULL_BUDGET
    big = max(n for n, _ in sizes)
    machine, spec = device_rows(harness.machine_description())
    inplace = harness.inplace_bandwidth(
        big, dataclasses.replace(budget, seconds=1.0), repeat=REPEAT[0]
    )
    machine["in-place bandwidth"] = f"{inplace:.0f} GB/s (jitted, donated `a + b`, {big:,} float32)"
    if spec:
        machine["specified bandwidth"] = (
            f"{spec} GB/s; in-place reaches {100 * inplace / spec:.0f} %"
        )
    print(f"device {machine['device']}; in-place {inplace:.0f} GB/s", file=sys.stderr, flush=True)

    def sizes_for(optimizer: str) -> list[tuple[int, int]]:
        # Adam gets every size; the others skip the middle leaf count to save device time.
        middle = sorted({k for n, k in sizes if n == big})[1:-1]
        return [s for s in sizes if optimizer == "adam" or s[0] != big or s[1] not in middle]

    notes: list[str] = []
    pure: list[Row] = []
    for optimizer in args.optimizers:
        for size in sizes_for(optimizer):
            n, k = size
            timed(
                pure,
                notes,
                "pure",
                optimizer,
                size,
                ("kopt", lambda o=optimizer, n=n, k=k: kopt_pure(o, n, k)),
                ("optax", lambda o=optimizer, n=n, k=k: optax_pure(o, n, k)),
                budget,
                target=1.0,
            )
    leaves: list[Row] = []
    for optimizer in args.optimizers:
        for n, k in sizes_for(optimizer):
            if n != big or k == 1:
                continue
            for variant, options in (
                ("kopt", {}),
                ("kopt.flatten", {"flat": True}),
                ("kopt.pack", {"pack": True}),
            ):
                timed(
                    leaves,
                    notes,
                    "leaves",
                    optimizer,
                    (n, k),
                    (
                        f"{variant}, {k} leaves",
                        lambda o=optimizer, n=n, k=k, kw=options: kopt_pure(o, n, k, **kw),
                    ),
                    ("kopt, 1 leaf", lambda o=optimizer, n=n: kopt_pure(o, n, 1)),
                    budget,
                    target=1.0,
                )
    for optimizer in args.optimizers:
        n, k = min(sizes)
        for variant, options in (("kopt.flatten", {"flat": True}), ("kopt.pack", {"pack": True})):
            timed(
                pure,
                notes,
                "pure",
                optimizer,
                (n, k),
                (variant, lambda o=optimizer, n=n, k=k, kw=options: kopt_pure(o, n, k, **kw)),
                ("optax", lambda o=optimizer, n=n, k=k: optax_pure(o, n, k)),
                budget,
                target=1.0,
            )
    # Packing everything costs a copy of the gradient per step, which only many leaves repay:
    # a few large leaves show what packing every leaf costs where there is little to save.
    # The sections below time Adam alone: they run only when --optimizers names it.
    adam = "adam" in args.optimizers
    few: list[Row] = []
    n_few, k_few = (big, FEW_LEAVES) if not args.quick else (big, 4)
    for variant, options in (("kopt.flatten", {"flat": True}), ("kopt.pack", {"pack": True})):
        if not adam:
            break
        timed(
            few,
            notes,
            "few",
            "adam",
            (n_few, k_few),
            (
                f"{variant}, {k_few} leaves",
                lambda n=n_few, k=k_few, kw=options: kopt_pure("adam", n, k, **kw),
            ),
            (f"kopt, {k_few} leaves", lambda n=n_few, k=k_few: kopt_pure("adam", n, k)),
            budget,
            target=1.0,
        )
    torch_rows: list[Row] = []
    for optimizer in ("adam", "sgd_momentum"):
        if optimizer not in args.optimizers:
            continue
        for size in sizes:
            n, k = size
            timed(
                torch_rows,
                notes,
                "torch",
                optimizer,
                size,
                ("kopt", lambda o=optimizer, n=n, k=k: kopt_pure(o, n, k)),
                ("torch fused", lambda o=optimizer, n=n, k=k: torch_fused_cuda(o, n, k)),
                budget,
            )
    facade: list[Row] = []
    plain = ("kopt facade", lambda n, k: kopt_facade("adam", n, k))
    pure_step = ("kopt pure", lambda n, k: kopt_pure("adam", n, k))
    scaled = (
        "kopt facade LossScaleOptimizer",
        lambda n, k: kopt_facade("adam", n, k, loss_scale=True),
    )
    # A LossScaleOptimizer keeps a skipped step's values with selects off the CPU (a
    # conditional would make the host read its predicate): their cost, at the ends of the range.
    ends = [(big, min(k for n, k in sizes if n == big)), min(sizes)]
    for (a_name, build_a), (b_name, build_b), at in [
        (plain, pure_step, sizes if adam else []),
        (scaled, plain, ends if adam else []),
    ]:
        for size in at:
            timed(
                facade,
                notes,
                "facade",
                "adam",
                size,
                (a_name, functools.partial(build_a, *size)),
                (b_name, functools.partial(build_b, *size)),
                budget,
            )

    def share(rows: list[Row]) -> str:
        table = harness.rows_table(rows, inplace)
        if not spec:
            return table
        extra = [
            f"{r.optimizer}, {harness.format_size(r.n_params)} in {r.n_leaves}: "
            f"{100 * r.gbps / spec:.0f} % of the specified {spec} GB/s"
            for r in rows
            if r.gbps is not None and r.n_params == big and r.a_name == "kopt"
        ]
        return table + ("\n\n" + "; ".join(extra) + "." if extra else "")

    parts = [
        *report_header("# GPU", "", args, machine),
        f"Times are medians per step in ms, of timed units of {REPEAT[0]} steps dispatched back "
        "to back and waited on once, as a training loop runs them; *A/B* is the median of "
        "per-unit ratios of A and B timed alternately (see the CPU report). *A GB/s* is the "
        "bytes an in-place step must move (28 per param for Adam, 20 for the others) over A's "
        "median time, with its share of the measured in-place bandwidth.",
    ]
    # A section without rows (its optimizers not chosen, or past --max-minutes) is left out.
    sections = [
        ("## Pure step: kopt against optax", None, pure, share),
        (
            f"## Many leaves against one leaf (kopt, the same {harness.format_size(big)} params)",
            None,
            leaves,
            None,
        ),
        (
            f"## A few large leaves, every leaf packed against loose (kopt, {k_few} leaves)",
            None,
            few,
            None,
        ),
        ("## kopt against torch.optim fused, on the same card", None, torch_rows, None),
        (
            "## Facade `apply_gradients` against kopt's pure step",
            "The *LossScaleOptimizer* rows put the same Adam inside a dynamic "
            "`LossScaleOptimizer` (finite gradients) against the facade's plain Adam: off the "
            "CPU its step keeps a skipped step's values with a select per value.",
            facade,
            None,
        ),
    ]
    for title, intro, rows, table in sections:
        if rows:
            parts += ["", title, ""] + ([intro, ""] if intro else [])
            parts.append((table or (lambda r: harness.rows_table(r, inplace)))(rows))
    if notes:
        parts += [""] + [f"- {n}" for n in notes]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    parser.add_argument(
        "--optimizers",
        default=OPTIMIZERS,
        type=optimizer_names,
        help="comma-separated, of " + ", ".join(OPTIMIZERS),
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=10,
        help="steps dispatched back to back per timed unit, waiting once (default 10)",
    )
    parser.add_argument(
        "--train", action="store_true", help="whole training steps instead (their own block)"
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="the main report, then the training steps, in one process (one device lease)",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="write the report into this file's GPU block"
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no new row after this many minutes of each report; the rows left out are "
        "named in its notes (for a machine lent for a fixed time)",
    )
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run the full sizes where JAX sees no GPU (otherwise refused; --quick runs anywhere)",
    )
    args = parser.parse_args(argv)
    if args.max_minutes is not None and not args.max_minutes > 0:
        parser.error(f"--max-minutes must be a positive number of minutes, not {args.max_minutes}")
    if not (args.quick or args.allow_cpu):
        import jax

        if jax.default_backend() != "gpu":
            # A machine whose CUDA jaxlib is missing falls back to the CPU, where the full
            # sizes would run for hours before writing anything.
            parser.error(
                f"JAX's default backend is {jax.default_backend()!r}, not a GPU (is the CUDA "
                "jaxlib installed?); pass --quick, or --allow-cpu to run the full sizes anyway"
            )
    REPEAT[0] = max(args.repeat, 1)
    parts = []
    if not args.train:
        parts.append((BLOCK, report))
    if args.train or args.all:
        parts.append((TRAIN_BLOCK, train_report))
    for block, make in parts:
        if args.max_minutes is not None:
            DEADLINE[0] = time.monotonic() + 60 * args.max_minutes
        text = make(args)
        print(text, flush=True)
        if args.output is not None:  # each block as soon as it is done
            harness.write_block(args.output, block, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

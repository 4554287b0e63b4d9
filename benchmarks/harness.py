"""Shared benchmark machinery: paired A/B timing, trees of arrays, bandwidth, machine, tables.

Imported by ``run.py`` and by ``peer_child.py`` (which may run under another interpreter, one
with TensorFlow or torch installed), so it depends on nothing but NumPy, and on JAX only inside
the functions that need it.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Step = Callable[[], None]

# Bytes an in-place step moves per float32 parameter: reads of the param, the gradient and each
# slot, writes of the param and each slot.
BYTES_PER_PARAM = {"adam": 28, "sgd_momentum": 20, "rmsprop": 20, "adagrad": 20}


@dataclasses.dataclass
class Timing:
    """The result of a paired A/B run: medians, and the spread of the per-iteration ratios."""

    a_ms: float
    b_ms: float
    ratio: float
    ratio_q1: float
    ratio_q3: float
    reps: int


@dataclasses.dataclass
class Row:
    """One line of a results table: contender A against contender B on one configuration."""

    suite: str
    optimizer: str
    n_params: int
    n_leaves: int
    a_name: str
    b_name: str
    timing: Timing | None = None
    target: float | None = None
    gbps: float | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Row:
        timing = data.pop("timing")
        return cls(**data, timing=None if timing is None else Timing(**timing))


@dataclasses.dataclass
class Budget:
    """How long to time each pair: ``seconds`` in all over ``rounds`` fresh pairs, each round
    between ``min_reps`` and ``max_reps`` iterations after ``warmup``."""

    seconds: float
    min_reps: int
    max_reps: int
    warmup: int
    rounds: int = 1


def paired(a: Step, b: Step, budget: Budget) -> tuple[list[float], list[float]]:
    """Times ``a`` and ``b`` alternately in one loop (ABBA order) so machine drift cancels.

    Each step must run one full update and wait for it. Returns the seconds of every step of
    ``a`` and of ``b``, paired by iteration.
    """
    for _ in range(budget.warmup):
        a()
        b()
    t0 = time.perf_counter()
    a()
    b()
    per_pair = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max(budget.seconds / per_pair, budget.min_reps), budget.max_reps))
    ta, tb = [], []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(reps):
            order = (a, b) if i % 2 == 0 else (b, a)
            times = []
            for fn in order:
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            if i % 2 == 1:
                times.reverse()
            ta.append(times[0])
            tb.append(times[1])
    finally:
        if gc_was_enabled:
            gc.enable()
    return ta, tb


def paired_rounds(
    build_a: Callable[[], Step], build_b: Callable[[], Step], budget: Budget
) -> Timing:
    """:func:`paired` over ``budget.rounds`` freshly built pairs, built in alternating order.

    Fresh instances average out where each one's buffers landed in memory: two instances of
    the very same 40 MB step can differ by 10 % for as long as they live. The ratio is the
    median of all per-iteration ratios ``a_i / b_i``, so a slow spell hitting both cancels.
    """
    ta: list[float] = []
    tb: list[float] = []
    share = dataclasses.replace(budget, seconds=budget.seconds / budget.rounds)
    for r in range(budget.rounds):
        if r % 2 == 0:
            a = build_a()
            b = build_b()
        else:
            b = build_b()
            a = build_a()
        xa, xb = paired(a, b, share)
        ta += xa
        tb += xb
        del a, b
        gc.collect()
    ratios = sorted(x / y for x, y in zip(ta, tb, strict=True))
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return Timing(
        a_ms=statistics.median(ta) * 1e3,
        b_ms=statistics.median(tb) * 1e3,
        ratio=statistics.median(ratios),
        ratio_q1=q1,
        ratio_q3=q3,
        reps=len(ratios),
    )


def numpy_leaves(n_params: int, n_leaves: int, seed: int) -> list[np.ndarray]:
    """``n_leaves`` float32 vectors of ``n_params`` values in all (the first takes the rest)."""
    rng = np.random.default_rng(seed)
    size = n_params // n_leaves
    sizes = [size + n_params - size * n_leaves] + [size] * (n_leaves - 1)
    return [rng.standard_normal(s, dtype=np.float32) for s in sizes]


def leaf_name(i: int) -> str:
    return f"w{i:04d}"


def jax_tree(n_params: int, n_leaves: int, seed: int) -> dict[str, Any]:
    """A dict of ``n_leaves`` jax arrays holding ``n_params`` float32 values."""
    import jax.numpy as jnp

    leaves = numpy_leaves(n_params, n_leaves, seed)
    return {leaf_name(i): jnp.asarray(x) for i, x in enumerate(leaves)}


def inplace_bandwidth(n: int, budget: Budget, repeat: int = 1) -> float:
    """GB/s of a jitted, donated ``a + b`` over ``n`` float32 (12 bytes per element), timed in
    units of ``repeat`` calls dispatched back to back and waited on once."""
    import jax
    import jax.numpy as jnp

    add = jax.jit(lambda a, b: a + b, donate_argnums=0)
    box = [jnp.ones(n, jnp.float32)]
    other = jnp.ones(n, jnp.float32)

    def step():
        for _ in range(repeat):
            box[0] = add(box[0], other)
        box[0].block_until_ready()

    times, _ = paired(step, step, dataclasses.replace(budget, rounds=1))
    return 12 * n * repeat / statistics.median(times) / 1e9


def git_commit() -> str:
    """The short commit of the checkout the benchmarks run from ("unknown" outside git)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        done = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return "unknown"
    commit = done.stdout.strip()
    if not commit:
        return "unknown"
    status = subprocess.run(
        ["git", "-C", root, "status", "--porcelain", "--", "kopt", "benchmarks"],
        capture_output=True,
        text=True,
        check=False,
    )
    # Changes not committed: the numbers are of that tree, not of the commit alone.
    return f"{commit} with uncommitted changes" if status.stdout.strip() else commit


def report_header(title: str, command: str, machine: dict[str, str]) -> list[str]:
    """A report's first lines: ``title``, when and at which commit it ran with which command
    line, and the machine table."""
    import datetime

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        title,
        "",
        f"Run on {now}, kopt at commit `{git_commit()}`: `{command}`",
        "",
        markdown_table(["machine", ""], [[k, v] for k, v in machine.items()]),
        "",
    ]


def machine_description() -> dict[str, str]:
    """CPU model, cores, memory, OS and the versions of every library that might be measured."""
    info = {"cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    info["cores"] = f"{usable} usable of {cores}"
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        info["memory"] = f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    info["os"] = f"{platform.system()} {platform.release()}"
    info["python"] = platform.python_version()
    for module in ("jax", "jaxlib", "numpy", "optax", "keras", "tensorflow", "tf_keras", "torch"):
        version = module_version(module)
        if version:
            info[module] = version
    return info


def module_version(module: str) -> str | None:
    from importlib import metadata

    names = {"tf_keras": "tf-keras", "tensorflow": "tensorflow"}
    for name in (names.get(module, module), module):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def format_size(n: int) -> str:
    for unit, scale in (("M", 1_000_000), ("k", 1_000)):
        if n >= scale and n % (scale // 10) == 0:
            return f"{n / scale:g}{unit}"
    return str(n)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def rows_table(rows: Sequence[Row], inplace_gbps: float | None) -> str:
    """The Markdown table of timed rows: times, paired ratio with its spread, target, bandwidth."""
    header = [
        "optimizer",
        "params",
        "leaves",
        "A",
        "B",
        "A ms",
        "B ms",
        "A/B",
        "A/B IQR",
        "target",
        "A GB/s",
        "reps",
    ]
    body = []
    for r in rows:
        t = r.timing
        if t is None:
            continue
        target = (
            ""
            if r.target is None
            else f"<= {r.target:g}" + (" ok" if round(t.ratio, 2) <= r.target else " **missed**")
        )
        if r.gbps is None:
            bandwidth = ""
        elif inplace_gbps:
            bandwidth = f"{r.gbps:.1f} ({100 * r.gbps / inplace_gbps:.0f} %)"
        else:
            bandwidth = f"{r.gbps:.1f}"
        body.append(
            [
                r.optimizer,
                format_size(r.n_params),
                str(r.n_leaves),
                r.a_name,
                r.b_name,
                f"{t.a_ms:.3f}",
                f"{t.b_ms:.3f}",
                f"{t.ratio:.2f}",
                f"{t.ratio_q1:.2f}–{t.ratio_q3:.2f}",
                target,
                bandwidth,
                str(t.reps),
            ]
        )
    return markdown_table(header, body)


def write_block(path: os.PathLike, name: str, text: str) -> None:
    """Writes ``text`` between ``<!-- begin name -->`` and ``<!-- end name -->`` in ``path``.

    The rest of the file stays: the CPU report (``run.py``) and the GPU report (``gpu.py``) are
    made on different machines and kept in one ``RESULTS.md``. A file without the markers gets
    the block appended (a new file holds only the block).
    """
    from pathlib import Path

    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    target = Path(path)
    old = target.read_text() if target.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        new = head + block + ("\n" + tail if tail else "")
    elif old.strip():
        new = old.rstrip() + "\n\n" + block
    else:
        new = block
    target.write_text(new)

"""kopt's benchmarks: one entry point, paired A/B timings printed as a Markdown report.

    python benchmarks/run.py                      # everything, full sizes (15 min on 2 cores)
    python benchmarks/run.py --quick --only pure  # smoke test: small sizes, few repetitions
    python benchmarks/run.py --output benchmarks/RESULTS.md --peer-python /path/to/tf/python

Suites (``--only``, comma-separated or repeated):

- ``pure``: kopt's jitted pure step (``update`` + ``apply_updates``, params and state donated)
  against optax's, for Adam, SGD with momentum, RMSprop and Adagrad, with the issue's targets.
- ``modern``: the rest of the functional core against optax's nearest equivalents, as jitted
  pure steps: AdamW, Lion, Lamb, Adafactor, and Adam inside the transformations users chain
  (``clip_by_global_norm``, ``masked``, ``multi_transform``, ``accumulate_gradients`` against
  ``optax.MultiSteps``, ``apply_if_finite``, ``ema``, ``decoupled_weight_decay``), at the sizes
  of more than one leaf.
- ``train``: a whole jitted training step of an MLP (loss, gradient, update) in optax, kopt and
  kopt with ``kopt.pack`` params.
- ``facade``: ``kopt.optimizers.Adam().apply_gradients`` over ``kopt.Variable``s against kopt's
  pure step (skipped with a note until ``kopt.optimizers`` imports).
- ``peers``: kopt (pure step, and the facade when it imports) against Keras 3 (eager
  ``apply_gradients`` and jitted ``stateless_apply``), tf.keras's legacy optimizers (eager and in
  ``tf.function``) and torch.optim's fused Adam, each where installed. ``--peer-python`` names
  another interpreter to run the TensorFlow/torch rows in when they are not importable here.
- ``sparse``: row-sparse (``kopt.IndexedSlices``) against dense updates of an embedding table
  (Adagrad on 512 rows of 1M x 64 is the issue's target), with the sparse step's XLA buffers.
- ``memory``: XLA's buffer analysis and the peak resident memory of one step, each
  configuration in its own process.
- ``compile``: how many programs are compiled while a hyperparameter changes.

Every timed row runs A and B alternately in one loop (ABBA), so machine drift hits both, in
three rounds of freshly built A and B (where an instance's buffers land in memory moves a 40 MB
step by up to 10 %); the ratio is the median of all per-iteration ratios, with its
interquartile range. Bandwidth is the
bytes an in-place step must move (28 per float32 parameter for Adam, 20 for the others) over
the median time, next to a measured in-place ``a + b`` bandwidth. Speed is measured here, never
asserted in the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import contenders  # noqa: E402
import harness  # noqa: E402
from contenders import Unavailable  # noqa: E402
from harness import Budget, Row  # noqa: E402

SUITES = ("pure", "modern", "train", "facade", "peers", "sparse", "memory", "compile")
OPTIMIZERS = ("adam", "sgd_momentum", "rmsprop", "adagrad")
FULL_SIZES = ((10_000_000, 1), (10_000_000, 200), (100_000, 100))
QUICK_SIZES = ((200_000, 1), (200_000, 20), (10_000, 10))
# The targets: kopt's pure step over optax's, ratio of medians.
TARGETS = {(10_000_000, 1): 1.0, (10_000_000, 200): 1.0, (100_000, 100): 0.6}
FULL_BUDGET = Budget(seconds=3.0, min_reps=5, max_reps=2000, warmup=3, rounds=3)
QUICK_BUDGET = Budget(seconds=0.15, min_reps=3, max_reps=200, warmup=1)


@dataclasses.dataclass
class Section:
    """A part of the report: a title, what it measures, its table and what was skipped."""

    title: str
    intro: str
    table: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)

    def markdown(self) -> str:
        parts = [f"## {self.title}", "", self.intro]
        if self.table:
            parts += ["", self.table]
        if self.notes:
            parts += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(parts)


@dataclasses.dataclass
class Config:
    sizes: tuple[tuple[int, int], ...]
    optimizers: tuple[str, ...]
    budget: Budget
    quick: bool
    peer_pythons: tuple[str, ...]
    inplace_gbps: float | None = None


def timed_row(
    suite: str,
    optimizer: str,
    size: tuple[int, int],
    a: tuple[str, Callable[[], harness.Step]],
    b: tuple[str, Callable[[], harness.Step]],
    budget: Budget,
    notes: list[str],
    target: float | None = None,
    bandwidth: bool = True,
    steps_per_call: int = 1,
) -> Row | None:
    """Builds both contenders and times them as a pair; a contender that cannot run is a note.
    ``steps_per_call``: how many optimizer steps each call of a contender runs (times are per
    step)."""
    n_params, n_leaves = size
    row = Row(suite, optimizer, n_params, n_leaves, a[0], b[0], target=target)
    where = f"{optimizer}, {harness.format_size(n_params)} params in {n_leaves} leaves"
    try:
        t = harness.paired_rounds(a[1], b[1], budget)
        row.timing = dataclasses.replace(
            t, a_ms=t.a_ms / steps_per_call, b_ms=t.b_ms / steps_per_call
        )
    except Unavailable as e:
        notes.append(f"skipped {a[0]} vs {b[0]} ({where}): {e}")
        return None
    except Exception as e:  # a broken contender should not hide the other rows
        notes.append(f"failed {a[0]} vs {b[0]} ({where}): {type(e).__name__}: {e}")
        traceback.print_exc(file=sys.stderr)
        return None
    bytes_per_param = harness.BYTES_PER_PARAM.get(optimizer)
    if bandwidth and bytes_per_param:
        row.gbps = bytes_per_param * n_params / (row.timing.a_ms * 1e-3) / 1e9
    print(
        f"  {row.a_name} vs {row.b_name}, {where}: {row.timing.ratio:.2f} "
        f"({row.timing.a_ms:.3f} ms against {row.timing.b_ms:.3f} ms)",
        file=sys.stderr,
        flush=True,
    )
    return row


def table_of(rows: list[Row | None], cfg: Config) -> str:
    return harness.rows_table([r for r in rows if r is not None], cfg.inplace_gbps)


# --- suites -------------------------------------------------------------------------------


def suite_pure(cfg: Config) -> Section:
    import kopt

    section = Section(
        "Pure step: kopt against optax",
        "`jax.jit(step, donate_argnums=(0, 1))` with `step(params, state, grads)` running "
        "`update` then `apply_updates`, in each library. Targets are the issue's (full sizes "
        "only). `kopt.flatten` rows wrap the same optimizer in `kopt.flatten` (slots of small "
        "leaves packed into one buffer per dtype). `kopt.pack` rows keep the params (and so "
        "their gradients and slots) in `kopt.pack` buffers, as a model that reads them through "
        "`unpack()` does; what that costs the rest of a training step is in the *training "
        "step* section. The *A/A* rows time two instances of the "
        "same optax step: how far from 1 a ratio strays with no difference at all.",
    )
    rows = []
    flatten = kopt.flatten
    for optimizer in cfg.optimizers:
        for size in cfg.sizes:
            n, leaves = size
            optax_step = (
                "optax",
                lambda o=optimizer, n=n, k=leaves: contenders.optax_pure(o, n, k),
            )
            rows.append(
                timed_row(
                    "pure",
                    optimizer,
                    size,
                    ("kopt", lambda o=optimizer, n=n, k=leaves: contenders.kopt_pure(o, n, k)),
                    optax_step,
                    cfg.budget,
                    section.notes,
                    target=None if cfg.quick else TARGETS.get(size),
                )
            )
            if leaves == 1:
                continue
            # The same optimizer with its params packed, and with its slots packed.
            for variant, options in (
                ("kopt.pack", {"pack": True}),
                ("kopt.flatten", {"wrap": flatten}),
            ):
                rows.append(
                    timed_row(
                        "pure",
                        optimizer,
                        size,
                        (
                            variant,
                            lambda o=optimizer, n=n, k=leaves, kw=options: contenders.kopt_pure(
                                o, n, k, **kw
                            ),
                        ),
                        optax_step,
                        cfg.budget,
                        section.notes,
                        target=None if cfg.quick else TARGETS.get(size),
                    )
                )
    for size in cfg.sizes:
        n, leaves = size
        optax_adam = lambda n=n, k=leaves: contenders.optax_pure("adam", n, k)  # noqa: E731
        rows.append(
            timed_row(
                "pure",
                "adam",
                size,
                ("optax", optax_adam),
                ("optax (A/A)", optax_adam),
                cfg.budget,
                section.notes,
            )
        )
    section.table = table_of(rows, cfg)
    return section


def suite_modern(cfg: Config) -> Section:
    section = Section(
        "Modern optimizers and chained transformations: kopt against optax",
        "The pure step of the *pure* section for the rest of the functional core, each against "
        "optax's nearest equivalent (its column *same maths?* says where the libraries "
        "differ). Sizes of one leaf are left out: masks and labels need several. "
        f"`accumulate_gradients` (every {contenders.ACCUMULATE_K}) is timed over whole cycles "
        "and shown per call. Compare the spread with the pure section's *A/A* rows.",
    )
    rows = []
    sizes = [size for size in cfg.sizes if size[1] > 1]
    try:
        for case in contenders.MODERN_CASES:
            for size in sizes:
                n, leaves = size
                kopt_side, optax_side = (
                    (
                        lib,
                        lambda lib=lib, c=case, n=n, k=leaves: contenders.modern_pure(lib, c, n, k),
                    )
                    for lib in ("kopt", "optax")
                )
                rows.append(
                    timed_row(
                        "modern",
                        case,
                        size,
                        kopt_side,
                        optax_side,
                        cfg.budget,
                        section.notes,
                        bandwidth=False,
                        steps_per_call=contenders.modern_calls(case),
                    )
                )
    finally:
        contenders.clear_modern_cache()
    section.table = table_of(rows, cfg)
    section.table += "\n\n" + harness.markdown_table(
        ["case", "same maths?"],
        [[case, contenders.MODERN_NOTES[case]] for case in contenders.MODERN_CASES],
    )
    return section


def suite_train(cfg: Config) -> Section:
    section = Section(
        "Training step: an MLP, loss to updated params (Adam)",
        "One jitted, donated step of a tanh MLP (`leaves / 2` square layers, kernel and bias, "
        "batch 64): loss, gradient, update, `apply_updates`, in each library. `kopt.pack` "
        "keeps the params in `kopt.pack` buffers and the model reads them through `unpack()`, "
        "so the step includes slicing the params out and writing the gradient into one buffer. "
        "*kopt facade minimize* rows time `opt.minimize(lambda: loss(variables, x, y), "
        "variables)` with `loss` jitted, against kopt's jitted step: what the facade's "
        "per-call tracing and its two compiled programs cost.",
    )
    rows = []
    for size in cfg.sizes:
        n, leaves = size
        if leaves < 2:
            continue
        optax_step = ("optax", lambda n=n, k=leaves: contenders.train_step("optax", "adam", n, k))
        for library in ("kopt", "kopt.pack"):
            rows.append(
                timed_row(
                    "train",
                    "adam",
                    size,
                    (
                        library,
                        lambda lib=library, n=n, k=leaves: contenders.train_step(lib, "adam", n, k),
                    ),
                    optax_step,
                    cfg.budget,
                    section.notes,
                    bandwidth=False,
                )
            )
        rows.append(
            timed_row(
                "train",
                "adam",
                size,
                (
                    "kopt facade minimize",
                    lambda n=n, k=leaves: contenders.facade_minimize("adam", n, k),
                ),
                ("kopt", lambda n=n, k=leaves: contenders.train_step("kopt", "adam", n, k)),
                cfg.budget,
                section.notes,
                bandwidth=False,
            )
        )
    section.table = table_of(rows, cfg)
    return section


def suite_facade(cfg: Config) -> Section:
    section = Section(
        "Facade: `kopt.optimizers.Adam().apply_gradients` against kopt's pure step",
        "`opt.apply_gradients(zip(grads, variables))` over `kopt.Variable`s (waiting on "
        "`opt.iterations`) against the jitted, donated pure step of `kopt.adam`: the facade's "
        "own cost. The *LossScaleOptimizer* rows put the same Adam inside a dynamic "
        "`LossScaleOptimizer` (finite gradients) against the facade's plain Adam: the cost of "
        "checking the gradients and of keeping a skipped step's values.",
    )
    reason = unavailable(contenders.kopt_facade)
    if reason:
        section.notes.append(f"skipped every facade row: {reason}")
        return section
    pairs = [
        (
            ("kopt facade", lambda n, k: contenders.kopt_facade("adam", n, k)),
            ("kopt pure", lambda n, k: contenders.kopt_pure("adam", n, k)),
        ),
        (
            (
                "kopt facade LossScaleOptimizer",
                lambda n, k: contenders.kopt_facade("adam", n, k, loss_scale=True),
            ),
            ("kopt facade", lambda n, k: contenders.kopt_facade("adam", n, k)),
        ),
    ]
    rows = [
        timed_row(
            "facade",
            "adam",
            size,
            (a_name, functools.partial(build_a, *size)),
            (b_name, functools.partial(build_b, *size)),
            cfg.budget,
            section.notes,
        )
        for (a_name, build_a), (b_name, build_b) in pairs
        for size in cfg.sizes
    ]
    section.table = table_of(rows, cfg)
    return section


def unavailable(build: Callable[..., harness.Step]) -> str | None:
    """Why a contender cannot run here (tried on a tiny Adam step), or None if it can."""
    try:
        build("adam", 16, 1)
    except Unavailable as e:
        return str(e)
    except Exception as e:
        return f"it fails a tiny step ({type(e).__name__}: {e})"
    return None


def in_process_peers() -> list[tuple[str, Callable[..., harness.Step]]]:
    return [
        ("Keras 3 eager", contenders.keras3_eager),
        ("Keras 3 jit stateless_apply", contenders.keras3_stateless),
        ("tf.keras legacy eager", lambda o, n, k: contenders.tf_keras_legacy(o, n, k, False)),
        ("tf.keras legacy tf.function", lambda o, n, k: contenders.tf_keras_legacy(o, n, k, True)),
        ("torch fused", contenders.torch_fused),
    ]


def peer_rows(cfg: Config, peers: list[str] | None, notes: list[str]) -> list[Row | None]:
    """kopt (pure step; facade when it imports) against each peer, in this process."""
    sides = [("kopt pure", lambda o, n, k: contenders.kopt_pure(o, n, k))]
    reason = unavailable(contenders.kopt_facade)
    if reason:
        notes.append(f"no kopt facade rows: {reason}")
    else:
        sides.append(("kopt facade", contenders.kopt_facade))
    rows = []
    for peer_name, build_peer in in_process_peers():
        if peers is not None and peer_name not in peers:
            continue
        reason = unavailable(build_peer)
        if reason:
            notes.append(f"skipped {peer_name} rows: {reason}")
            continue
        for size in cfg.sizes:
            n, leaves = size
            for side_name, build_side in sides:
                rows.append(
                    timed_row(
                        "peers",
                        "adam",
                        size,
                        (side_name, lambda f=build_side, n=n, k=leaves: f("adam", n, k)),
                        (peer_name, lambda f=build_peer, n=n, k=leaves: f("adam", n, k)),
                        cfg.budget,
                        notes,
                    )
                )
    return rows


def suite_peers(cfg: Config) -> Section:
    section = Section(
        "Peers: kopt against Keras 3, tf.keras and torch (Adam)",
        "A is kopt's jitted pure step or its facade; B is the peer as its users run it. "
        "Rows run in another interpreter say so in the notes.",
    )
    local_notes: list[str] = []
    rows = peer_rows(cfg, None, local_notes)
    missing = [
        name
        for name in ("tf.keras legacy eager", "tf.keras legacy tf.function", "torch fused")
        if not any(r is not None and r.b_name == name for r in rows)
    ]
    ran_elsewhere: set[str] = set()
    for python in cfg.peer_pythons:
        if not missing:
            break
        child_rows, child_notes = run_peer_child(python, cfg, missing)
        rows += child_rows
        section.notes += child_notes
        ran_elsewhere |= {r.b_name for r in child_rows}
        missing = [m for m in missing if m not in ran_elsewhere]
    section.notes[:0] = [
        n for n in local_notes if not any(n.startswith(f"skipped {m} rows") for m in ran_elsewhere)
    ]
    if not cfg.peer_pythons and missing:
        section.notes.append(
            "no --peer-python given: rows needing an interpreter with tensorflow/torch were not "
            "retried elsewhere"
        )
    section.table = table_of(rows, cfg)
    return section


def run_peer_child(python: str, cfg: Config, peers: list[str]) -> tuple[list[Row], list[str]]:
    """Runs the named peers' rows under another interpreter (kopt imported from this tree)."""
    request = {
        "sizes": cfg.sizes,
        "budget": dataclasses.asdict(cfg.budget),
        "peers": peers,
    }
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    try:
        done = subprocess.run(
            [python, str(Path(__file__)), "--peer-child", json.dumps(request)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
    except OSError as e:
        return [], [f"could not run the peer interpreter: {e}"]
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return [], [f"the peer interpreter failed (exit {done.returncode}): {tail[0]}"]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v)
    rows = [Row.from_json(r) for r in result["rows"]]
    # The report names the peer interpreter by what it holds, not by where it is installed.
    notes = [f"under the peer interpreter ({versions}): {n}" for n in result["notes"]]
    if rows:
        ran = sorted({r.b_name for r in rows})
        notes.append(f"rows for {', '.join(ran)} ran under a second interpreter ({versions})")
    return rows, notes


def peer_child(request: dict) -> None:
    budget = Budget(**request["budget"])
    cfg = Config(
        sizes=tuple(tuple(s) for s in request["sizes"]),
        optimizers=("adam",),
        budget=budget,
        quick=False,
        peer_pythons=(),
    )
    notes: list[str] = []
    rows = peer_rows(cfg, request["peers"], notes)
    versions = {
        m: harness.module_version(m) for m in ("jax", "tensorflow", "tf_keras", "keras", "torch")
    }
    out = {"rows": [r.to_json() for r in rows if r is not None], "notes": notes}
    print(json.dumps({**out, "versions": versions}))


def suite_sparse(cfg: Config) -> Section:
    # The case: Adagrad updating 512 rows of a 1M x 64 table.
    vocab, dim, batch = (5_000, 16, 64) if cfg.quick else (1_000_000, 64, 512)
    section = Section(
        "Sparse against dense updates (kopt)",
        f"An embedding table of {vocab:,} x {dim} float32 and a gradient of {batch:,} rows "
        "(random indices, duplicates included): the jitted, donated step with the gradient as "
        "`kopt.IndexedSlices` (A) against the same step with it dense (B). Adam decays "
        "every row's moments and moves every row, as Keras's sparse Adam does, so its step "
        "stays table-sized. The second table is the compiled sparse step's own buffers, from "
        "XLA's `memory_analysis()`: a table-sized temporary would show there.",
    )
    rows = []
    memory = []
    for optimizer in ("sgd", "sgd_momentum", "adagrad", "adam"):
        rows.append(
            timed_row(
                "sparse",
                optimizer,
                (vocab * dim, 1),
                ("sparse", lambda o=optimizer: sparse_step(o, vocab, dim, batch, True)),
                ("dense", lambda o=optimizer: sparse_step(o, vocab, dim, batch, False)),
                cfg.budget,
                section.notes,
                target=None if cfg.quick or optimizer != "adagrad" else 0.1,
                bandwidth=False,
            )
        )
        try:
            analysis = sparse_step(optimizer, vocab, dim, batch, True, analyse=True)
        except Exception as e:  # memory_analysis is not available on every backend
            section.notes.append(f"no memory analysis for {optimizer}: {type(e).__name__}: {e}")
            continue
        table_mb = vocab * dim * 4 / 1e6
        memory.append(
            [
                optimizer,
                f"{table_mb:.1f}",
                f"{analysis.temp_size_in_bytes / 1e6:.2f}",
                f"{(analysis.output_size_in_bytes - analysis.alias_size_in_bytes) / 1e6:.2f}",
            ]
        )
    section.table = table_of(rows, cfg)
    if memory:
        section.table += "\n\n" + harness.markdown_table(
            ["optimizer", "table MB", "XLA temp MB", "XLA out, not aliased MB"], memory
        )
    return section


def sparse_step(
    optimizer: str, vocab: int, dim: int, batch: int, sparse: bool, analyse: bool = False
):
    import jax.numpy as jnp
    import numpy as np

    import kopt

    rng = np.random.default_rng(0)
    table = {"embedding": jnp.asarray(rng.standard_normal((vocab, dim), dtype=np.float32))}
    rows = jnp.asarray(rng.standard_normal((batch, dim), dtype=np.float32))
    indices = jnp.asarray(rng.integers(0, vocab, batch).astype(np.int32))
    grad = kopt.IndexedSlices(rows, indices, (vocab, dim))
    grads = {"embedding": grad if sparse else grad.to_dense()}
    if optimizer == "sgd":
        tx = kopt.sgd(0.01)
    else:
        tx = contenders.kopt_transformation(optimizer)
    if analyse:
        step = contenders.jitted_step(tx, kopt.apply_updates)
        return step.lower(table, tx.init(table), grads).compile().memory_analysis()
    return contenders.pure_step(tx, kopt.apply_updates, table, grads)


def suite_memory(cfg: Config) -> Section:
    import kopt

    section = Section(
        "Peak memory of one step (Adam)",
        "Each configuration in its own process. *Live* is params + grads + state. *XLA temp* and "
        "*XLA out, not aliased* come from the compiled step's `memory_analysis()`; *step peak* "
        "is the growth of resident memory (VmHWM after resetting it) over resident memory "
        "before the step: what one donated step adds on top of what is already held.",
    )
    libraries = ["kopt", "optax"] + (["kopt.flatten"] if hasattr(kopt, "flatten") else [])
    body = []
    for n, leaves in cfg.sizes:
        for library in libraries:
            request = {"library": library, "n_params": n, "n_leaves": leaves}
            done = subprocess.run(
                [sys.executable, str(Path(__file__)), "--memory-child", json.dumps(request)],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
                section.notes.append(f"{library} {n}x{leaves} failed: {tail[0]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            mb = lambda x: "n/a" if x is None else f"{x / 2**20:.1f}"  # noqa: E731
            body.append(
                [
                    library,
                    harness.format_size(n),
                    str(leaves),
                    mb(r["live"]),
                    mb(r["xla_temp"]),
                    mb(r["xla_out_not_aliased"]),
                    mb(r["step_peak"]),
                ]
            )
    section.table = harness.markdown_table(
        [
            "library",
            "params",
            "leaves",
            "live MB",
            "XLA temp MB",
            "XLA out, not aliased MB",
            "step peak MB",
        ],
        body,
    )
    return section


def memory_child(request: dict) -> None:
    import re

    import jax
    import numpy as np
    import optax

    import kopt

    n, leaves = request["n_params"], request["n_leaves"]
    library = request["library"]
    if library == "optax":
        tx, apply = contenders.optax_transformation("adam"), optax.apply_updates
    else:
        tx, apply = contenders.kopt_transformation("adam"), kopt.apply_updates
        if library == "kopt.flatten":
            tx = kopt.flatten(tx)
    params = harness.jax_tree(n, leaves, 0)
    grads = harness.jax_tree(n, leaves, 1)
    state = tx.init(params)
    fn = contenders.jitted_step(tx, apply)
    compiled = fn.lower(params, state, grads).compile()
    analysis = compiled.memory_analysis()
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    live = nbytes((params, state, grads))

    def status(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                match = re.search(rf"{key}:\s+(\d+) kB", f.read())
            return None if match is None else int(match.group(1)) * 1024
        except OSError:
            return None

    step_peak = None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS")
        params, state = compiled(params, state, grads)
        jax.block_until_ready(params)
        after = status("VmHWM")
        if before is not None and after is not None:
            step_peak = after - before
    except OSError:
        params, state = compiled(params, state, grads)
    print(
        json.dumps(
            {
                "live": live,
                "xla_temp": getattr(analysis, "temp_size_in_bytes", None),
                "xla_out_not_aliased": None
                if analysis is None
                else analysis.output_size_in_bytes - analysis.alias_size_in_bytes,
                "step_peak": step_peak,
                "check": float(np.asarray(jax.tree.leaves(params)[0][0])),
            }
        )
    )


def suite_compile(cfg: Config) -> Section:
    n, leaves = cfg.sizes[-1]
    changes = 5
    section = Section(
        "Compilations while a hyperparameter changes (Adam)",
        "Backend compilations counted with `jax.monitoring`: in a fresh optimizer's first two "
        f"steps (1 is ideal: one program), then over {changes} learning-rate changes each "
        f"followed by a step (0 is ideal: the change is data). {harness.format_size(n)} params "
        f"in {leaves} leaves; a throwaway instance runs first so eager helpers are compiled. "
        "The wall time of the first two steps is mostly compile time.",
    )
    body = []
    for name, build in compile_cases():
        try:
            warm = build(n, leaves)
            warm(0.5)
            warm(0.4)
            change_and_step = build(n, leaves)
            start = time.perf_counter()
            first = count_compilations(lambda s=change_and_step: [s(0.5), s(0.4)])
            seconds = time.perf_counter() - start
            later = count_compilations(
                lambda s=change_and_step: [s(0.1 * i) for i in range(changes)]
            )
            body.append([name, str(first), f"{seconds:.2f}", str(later)])
        except Unavailable as e:
            section.notes.append(f"skipped {name}: {e}")
        except Exception as e:
            section.notes.append(f"failed {name}: {type(e).__name__}: {e}")
    section.table = harness.markdown_table(
        [
            "how the learning rate changes",
            "first two steps",
            "their wall time, s",
            f"next {changes} changes",
        ],
        body,
    )
    return section


_compile_events: list[str] = []


def count_compilations(fn: Callable[[], object]) -> int:
    import jax

    if not _compile_events:
        _compile_events.append("registered")

        def listener(event: str, duration: float, **kwargs) -> None:
            if event == "/jax/core/compile/backend_compile_duration":
                _compile_events.append(event)

        jax.monitoring.register_event_duration_secs_listener(listener)
    before = len(_compile_events)
    fn()
    return len(_compile_events) - before


def compile_cases() -> list[tuple[str, Callable[[int, int], Callable[[float], None]]]]:
    def kopt_set_hyper(n, leaves):
        import kopt

        tx = kopt.adam(learning_rate=1e-3)
        fn = contenders.jitted_step(tx, kopt.apply_updates)
        params, grads = harness.jax_tree(n, leaves, 0), harness.jax_tree(n, leaves, 1)
        box = [params, tx.init(params)]

        def change_and_step(lr):
            box[1] = kopt.set_hyperparam(box[1], "learning_rate", lr)
            box[0], box[1] = fn(box[0], box[1], grads)
            wait_for(box[0])

        return change_and_step

    def optax_rebuilt(n, leaves):
        import optax

        params, grads = harness.jax_tree(n, leaves, 0), harness.jax_tree(n, leaves, 1)
        box = [params, None]

        def change_and_step(lr):
            tx = optax.adam(lr, eps=1e-7)
            fn = contenders.jitted_step(tx, optax.apply_updates)
            box[1] = box[1] if box[1] is not None else tx.init(params)
            box[0], box[1] = fn(box[0], box[1], grads)
            wait_for(box[0])

        return change_and_step

    def optax_injected(n, leaves):
        import optax

        tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3, eps=1e-7)
        fn = contenders.jitted_step(tx, optax.apply_updates)
        params, grads = harness.jax_tree(n, leaves, 0), harness.jax_tree(n, leaves, 1)
        box = [params, tx.init(params)]

        def change_and_step(lr):
            box[1].hyperparams["learning_rate"] = lr
            box[0], box[1] = fn(box[0], box[1], grads)
            wait_for(box[0])

        return change_and_step

    def kopt_facade(n, leaves):
        try:
            import kopt
            from kopt import optimizers
        except ImportError as e:
            raise Unavailable(f"kopt.optimizers cannot be imported ({e})") from e
        variables = [kopt.Variable(x) for x in harness.numpy_leaves(n, leaves, 0)]
        grads = [g for g in harness.jax_tree(n, leaves, 1).values()]
        opt = optimizers.Adam(learning_rate=1e-3)

        def change_and_step(lr):
            opt.learning_rate = lr
            opt.apply_gradients(zip(grads, variables, strict=True))
            opt.iterations.value.block_until_ready()

        return change_and_step

    def keras3_eager(n, leaves):
        keras = contenders._keras3()
        variables = [keras.Variable(x) for x in harness.numpy_leaves(n, leaves, 0)]
        grads = list(harness.jax_tree(n, leaves, 1).values())
        opt = keras.optimizers.Adam(learning_rate=1e-3)

        def change_and_step(lr):
            opt.learning_rate = lr
            opt.apply_gradients(zip(grads, variables, strict=True))
            variables[-1].value.block_until_ready()

        return change_and_step

    def keras3_stateless(n, leaves):
        import jax

        keras = contenders._keras3()
        variables = [keras.Variable(x) for x in harness.numpy_leaves(n, leaves, 0)]
        grads = list(harness.jax_tree(n, leaves, 1).values())
        opt = keras.optimizers.Adam(learning_rate=1e-3)
        opt.build(variables)
        fn = jax.jit(opt.stateless_apply, donate_argnums=(0, 2))
        box = [[v.value for v in opt.variables], [v.value for v in variables]]
        lr_index = [v.path for v in opt.variables].index(opt._learning_rate.path)

        def change_and_step(lr):
            box[0][lr_index] = jax.numpy.asarray(lr, box[0][lr_index].dtype)
            box[1], box[0] = fn(box[0], grads, box[1])
            box[1][-1].block_until_ready()

        return change_and_step

    return [
        (
            "kopt: `kopt.set_hyperparam(state, 'learning_rate', lr)`, jitted step",
            kopt_set_hyper,
        ),
        ("optax: `optax.adam(lr)` rebuilt, jitted step", optax_rebuilt),
        ("optax: `optax.inject_hyperparams(optax.adam)`, jitted step", optax_injected),
        ("kopt facade: `opt.learning_rate = lr`; `apply_gradients`", kopt_facade),
        ("Keras 3: `opt.learning_rate = lr`; eager `apply_gradients`", keras3_eager),
        ("Keras 3: learning-rate variable changed; jitted `stateless_apply`", keras3_stateless),
    ]


def wait_for(tree: dict) -> None:
    tree[max(tree)].block_until_ready()


# --- report -------------------------------------------------------------------------------


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``"10M:1,100k:100"`` -> ``((10_000_000, 1), (100_000, 100))``."""
    scale = {"k": 1_000, "m": 1_000_000}
    sizes = []
    for item in text.split(","):
        try:
            n, leaves = item.strip().lower().split(":")
            factor = scale.get(n[-1], 1)
            sizes.append((int(float(n.rstrip("km")) * factor), int(leaves)))
        except ValueError as e:
            raise argparse.ArgumentTypeError(
                f"--sizes: expected PARAMS:LEAVES items such as 10M:200, received {item!r}"
            ) from e
    return tuple(sizes)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="SUITE[,SUITE]",
        help=f"suites to run, of {', '.join(SUITES)} (default: all)",
    )
    parser.add_argument(
        "--sizes", type=parse_sizes, default=None, help="PARAMS:LEAVES list, e.g. 10M:1,100k:100"
    )
    parser.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help=f"optimizers for the pure suite, of {', '.join(OPTIMIZERS)}",
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="time per A/B pair (default 3, quick 0.15)"
    )
    parser.add_argument(
        "--peer-python",
        action="append",
        default=[p for p in [os.environ.get("KOPT_BENCH_PEER_PYTHON")] if p],
        help="another interpreter for the tf.keras/torch rows (env KOPT_BENCH_PEER_PYTHON)",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="also write the report into this file's CPU block"
    )
    parser.add_argument("--peer-child", help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    only = [s.strip() for item in (args.only or [",".join(SUITES)]) for s in item.split(",")]
    unknown = sorted(set(only) - set(SUITES))
    if unknown:
        parser.error(f"--only: unknown suites {unknown}; choose from {', '.join(SUITES)}")
    args.only = [s for s in SUITES if s in only]
    optimizers = [o.strip() for o in args.optimizers.split(",")]
    unknown = sorted(set(optimizers) - set(OPTIMIZERS))
    if unknown:
        parser.error(f"--optimizers: unknown {unknown}; choose from {', '.join(OPTIMIZERS)}")
    args.optimizers = tuple(optimizers)
    return args


def _public_argv(argv: list[str]) -> list[str]:
    """The command line as the report shows it: the peer interpreter becomes a placeholder and
    an output file outside the repository its name, so a committed report names nothing of the
    machine it ran on."""

    def public(flag: str, value: str) -> str:
        if flag == "--peer-python":
            return "PEER_PYTHON"
        path = Path(value).resolve()
        return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name

    shown, hide_next = [], None
    for arg in argv:
        if hide_next:
            shown.append(public(hide_next, arg))
            hide_next = None
            continue
        flag, eq, value = arg.partition("=")
        if flag in ("--peer-python", "--output"):
            if eq:
                shown.append(f"{flag}={public(flag, value)}")
            else:
                shown.append(flag)
                hide_next = flag
            continue
        shown.append(arg)
    return shown


def header(cfg: Config, argv: list[str], loads: list[tuple[float, ...]]) -> str:
    machine = harness.machine_description()
    lines = [
        "# kopt benchmarks",
        "",
        f"Run on {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
        + f", kopt at commit `{harness.git_commit()}`"
        + f": `python benchmarks/run.py {' '.join(_public_argv(argv))}`".rstrip(),
        "",
        "| machine | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in machine.items()]
    if loads:
        shown = " at start, ".join(", ".join(f"{x:.1f}" for x in load) for load in loads)
        lines.append(f"| load average (1, 5, 15 min) | {shown} at end |")
    if cfg.inplace_gbps:
        lines.append(
            f"| in-place bandwidth | {cfg.inplace_gbps:.1f} GB/s (jitted, donated `a + b` on "
            f"float32, 12 bytes per element) |"
        )
    lines += [
        "",
        "Times are medians per step in ms. *A/B* is the median of per-iteration ratios of A and B "
        f"timed alternately in one loop, over {cfg.budget.rounds} round(s) of freshly built A and "
        "B; *IQR* its interquartile range. *A GB/s* is the bytes an "
        "in-place step must move over A's median time, with its share of the in-place bandwidth.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.peer_child:
        peer_child(json.loads(args.peer_child))
        return 0
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return 0
    budget = QUICK_BUDGET if args.quick else FULL_BUDGET
    if args.seconds is not None:
        budget = dataclasses.replace(budget, seconds=args.seconds)
    cfg = Config(
        sizes=args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES),
        optimizers=args.optimizers,
        budget=budget,
        quick=args.quick,
        peer_pythons=tuple(args.peer_python),
    )
    cfg.inplace_gbps = harness.inplace_bandwidth(max(n for n, _ in cfg.sizes), budget)
    suites = {
        "pure": suite_pure,
        "modern": suite_modern,
        "train": suite_train,
        "facade": suite_facade,
        "peers": suite_peers,
        "sparse": suite_sparse,
        "memory": suite_memory,
        "compile": suite_compile,
    }
    loads = [os.getloadavg()] if hasattr(os, "getloadavg") else []
    sections = []
    for name in args.only:
        print(f"[{name}]", file=sys.stderr)
        sections.append(suites[name](cfg))
    if loads:
        loads.append(os.getloadavg())
    report = "\n\n".join([header(cfg, argv, loads)] + [s.markdown() for s in sections]) + "\n"
    print(report)
    if args.output is not None:
        harness.write_block(args.output, "cpu", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark entry point runs end to end at a tiny size. Speed is never asserted here."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
    """Runs ``benchmarks/<script>`` as a user would (one device: no simulated ones)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
        check=False,
    )


def quick_gpu_report(tmp_path: Path, *args: str) -> str:
    """Runs ``gpu.py --quick --repeat 2`` with ``args`` into a fresh results file; returns the
    text of its GPU block."""
    results = tmp_path / "RESULTS.md"
    done = run_benchmark("gpu.py", "--quick", "--repeat", "2", *args, "--output", str(results))
    assert done.returncode == 0, done.stderr[-3000:]
    return results.read_text().split("<!-- begin gpu -->")[1].split("<!-- end gpu -->")[0]


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every results table in a report (those headed ``| optimizer | params |``), as rows of
    cells."""
    lines = text.splitlines()
    tables = []
    for i, line in enumerate(lines):
        if not line.startswith("| optimizer | params |"):
            continue
        assert lines[i + 1].startswith("|---")
        rows = []
        for row in lines[i + 2 :]:
            if not row.startswith("|"):
                break
            rows.append([cell.strip() for cell in row.strip("|").split("|")])
        tables.append(rows)
    return tables


# The modern suite's cases: the modern optimizers, and Adam inside each wrapper users chain.
MODERN_CASES = (
    "adamw",
    "lion",
    "lamb",
    "adafactor",
    "clip_by_global_norm+adam",
    "adamw masked",
    "multi_transform",
    "accumulate_gradients",
    "apply_if_finite",
    "adam+ema",
    "decoupled_weight_decay",
)


def test_quick_pure_and_modern_benchmarks_print_markdown_tables(tmp_path):
    report = tmp_path / "REPORT.md"
    peer = tmp_path / "peer-env" / "bin" / "python"
    done = run_benchmark(
        "run.py",
        "--quick",
        "--only",
        "pure,modern",
        "--sizes",
        "2k:1,2k:4",
        "--seconds",
        "0.02",
        "--output",
        str(report),
        f"--peer-python={peer}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The report, which gets committed, shows its command line without the machine's paths.
    written = report.read_text()
    assert "--output REPORT.md --peer-python=PEER_PYTHON`" in written, written[:500]
    assert str(tmp_path) not in written and str(tmp_path) not in done.stdout
    pure, modern = markdown_tables(done.stdout)
    pairs = {(row[0], row[2], row[3], row[4]) for row in pure}
    for optimizer in ("adam", "sgd_momentum", "rmsprop", "adagrad"):
        for leaves in ("1", "4"):
            assert (optimizer, leaves, "kopt", "optax") in pairs, done.stdout
    # Every modern case against optax at the size of several leaves only; none failed.
    assert "failed" not in done.stdout.split("## Modern")[1], done.stdout
    assert sorted((row[0], row[2], row[3], row[4]) for row in modern) == sorted(
        (case, "4", "kopt", "optax") for case in MODERN_CASES
    ), done.stdout
    for row in pure + modern:
        assert float(row[5]) > 0 and float(row[6]) > 0 and float(row[7]) > 0, row
    # Each case says how its maths compare with optax's.
    for case in MODERN_CASES:
        assert f"\n| {case} | " in done.stdout.split("| case | same maths? |")[1], case


def test_gpu_benchmark_runs_small_on_the_cpu_and_writes_its_blocks(tmp_path):
    """``--all``: the main report, then the training steps, each into its own block."""
    results = tmp_path / "RESULTS.md"
    results.write_text("<!-- begin cpu -->\nkept\n<!-- end cpu -->\n")
    done = run_benchmark(
        "gpu.py",
        "--all",
        "--quick",
        "--optimizers",
        "adam",
        "--repeat",
        "2",
        "--output",
        str(results),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("<!-- begin cpu -->\nkept\n<!-- end cpu -->")
    main = text.split("<!-- begin gpu -->")[1].split("<!-- end gpu -->")[0]
    for variant in ("kopt.pack, 100 leaves", "kopt.flatten, 100 leaves", "kopt, 100 leaves"):
        assert f"| {variant} | kopt, 1 leaf |" in main, variant
    for variant in ("kopt.flatten, 4 leaves", "kopt.pack, 4 leaves"):
        assert f"| {variant} | kopt, 4 leaves |" in main, variant
    for size in ("| 1M | 1 |", "| 10k | 10 |"):
        assert f"{size} kopt facade LossScaleOptimizer | kopt facade |" in main, size
    assert "<!-- begin gpu-train -->" in text and text.rstrip().endswith("<!-- end gpu-train -->")
    train = text.split("<!-- begin gpu-train -->")[1]
    for variant in ("kopt", "kopt.pack", "kopt.pack(None)"):
        assert f"| 200k | 20 | {variant} | optax |" in train, variant


def test_gpu_benchmark_checks_its_arguments_before_any_device_time():
    """A misspelt optimizer ran to the end with a note per row; a machine whose JAX fell back
    to the CPU ran the full sizes for hours before writing anything."""
    done = run_benchmark("gpu.py", "--quick", "--optimizers", "adam,sgd")
    assert done.returncode == 2 and "unknown optimizer(s) ['sgd']" in done.stderr
    done = run_benchmark("gpu.py", "--optimizers", "adam")
    assert done.returncode == 2 and "not a GPU" in done.stderr and "--allow-cpu" in done.stderr


def test_gpu_benchmark_names_a_cards_bandwidth_by_whole_words():
    """``L4`` was found in ``NVIDIA L40S`` (300 GB/s for an 864 GB/s card)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert gpu.spec_gbps("NVIDIA L40S") == 864
    assert gpu.spec_gbps("NVIDIA L4") == 300
    assert gpu.spec_gbps("NVIDIA GH200 480GB") is None  # not an H200
    assert gpu.spec_gbps("NVIDIA H100 80GB HBM3") == 3350
    assert gpu.spec_gbps("NVIDIA A100-SXM4-80GB") == 2039


def test_one_pass_kernel_matches_kopt_adam_and_is_timed(tmp_path):
    """The one-pass experiment compiles its kernel, checks it against ``kopt.adam`` (the script
    fails on a mismatch) and times it against kopt's step; without a C++ compiler it cannot."""
    if not any(shutil.which(name) for name in ("c++", "g++", "clang++")):
        pytest.skip("no C++ compiler")
    report = tmp_path / "REPORT.md"
    done = run_benchmark("one_pass.py", "--quick", "--output", str(report))
    assert done.returncode == 0, done.stderr[-3000:]
    written = report.read_text()
    assert written.startswith("<!-- begin one-pass -->"), written[:200]
    assert "matched three of `kopt.adam`" in written, written
    assert "| adam | 200k | 1 | one-pass custom call | kopt |" in written, written
    assert str(tmp_path) not in written


def test_gpu_benchmark_stops_starting_rows_after_max_minutes(tmp_path):
    """A leased GPU machine's time is counted: past ``--max-minutes`` a report starts no new
    row, still writes the rows it measured, and names the ones it left out."""
    main = quick_gpu_report(tmp_path, "--optimizers", "adam", "--max-minutes", "0.0001")
    assert "--max-minutes 0.0001" in main
    assert "- not measured: kopt vs optax (adam, 1M params in 1 leaves), past --max-minutes" in main
    assert "- not measured: kopt facade vs kopt pure (adam, 10k params in 10 leaves)" in main
    done = run_benchmark("gpu.py", "--quick", "--max-minutes", "0")
    assert done.returncode == 2 and "--max-minutes must be a positive" in done.stderr


def test_gpu_benchmark_times_adam_only_sections_only_when_asked_for_adam(tmp_path):
    """``--optimizers sgd_momentum`` still timed Adam's few-leaves and facade rows, and printed
    the headings of sections that had no rows."""
    main = quick_gpu_report(tmp_path, "--optimizers", "sgd_momentum")
    optimizers = {row[0] for table in markdown_tables(main) for row in table}
    assert optimizers == {"sgd_momentum"}, optimizers
    assert "## Pure step: kopt against optax" in main
    assert "A few large leaves" not in main and "## Facade" not in main
    for heading in [line for line in main.splitlines() if line.startswith("## ")]:
        assert main.split(heading)[1].lstrip().startswith(("|", "The ")), heading

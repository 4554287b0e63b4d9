"""Plot every learning-rate schedule in ``kopt.schedules`` on one figure.

Each panel draws one schedule function with a few argument choices, evaluated (with
``jax.vmap``) at every step from 0 to ``--steps``. The same functions back the Keras-style
classes in ``kopt.optimizers.schedules``, and any of them can be passed as an optimizer's
``learning_rate``.

Run:
    python examples/schedules_gallery.py     # writes examples/out/schedules_gallery.png
    python examples/schedules_gallery.py --steps 200 --out /tmp/schedules.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kopt import schedules

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "schedules_gallery.png"


def gallery(total: int) -> dict[str, dict[str, schedules.Schedule]]:
    """Panel title -> {curve label -> schedule}, scaled to ``total`` steps."""
    quarter = max(total // 4, 1)
    tenth = max(total // 10, 1)
    return {
        "exponential_decay": {
            f"decay_rate=0.5, decay_steps={quarter}": schedules.exponential_decay(
                1.0, quarter, 0.5
            ),
            "... staircase=True": schedules.exponential_decay(1.0, quarter, 0.5, staircase=True),
        },
        "piecewise_constant_decay": {
            f"boundaries=[{total // 3}, {2 * total // 3}]": schedules.piecewise_constant_decay(
                [total // 3, 2 * total // 3], [1.0, 0.5, 0.1]
            ),
        },
        "polynomial_decay": {
            "power=1 (linear)": schedules.polynomial_decay(1.0, total, end_learning_rate=0.0),
            "power=2": schedules.polynomial_decay(1.0, total, end_learning_rate=0.0, power=2.0),
            f"power=1, cycle=True, decay_steps={quarter}": schedules.polynomial_decay(
                1.0, quarter, end_learning_rate=0.1, cycle=True
            ),
        },
        "inverse_time_decay": {
            f"decay_rate=1, decay_steps={tenth}": schedules.inverse_time_decay(1.0, tenth, 1.0),
            "... staircase=True": schedules.inverse_time_decay(1.0, tenth, 1.0, staircase=True),
        },
        "cosine_decay": {
            "alpha=0": schedules.cosine_decay(1.0, total),
            "alpha=0.2": schedules.cosine_decay(1.0, total, alpha=0.2),
            f"warmup_target=1, warmup_steps={tenth}": schedules.cosine_decay(
                0.0, total - tenth, warmup_target=1.0, warmup_steps=tenth
            ),
        },
        "cosine_decay_restarts": {
            f"first_decay_steps={tenth}, t_mul=2": schedules.cosine_decay_restarts(1.0, tenth),
            "... m_mul=0.7": schedules.cosine_decay_restarts(1.0, tenth, m_mul=0.7),
        },
    }


def plot(total: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = jnp.arange(total + 1)
    panels = gallery(total)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True)
    for ax, (title, curves) in zip(axes.flat, panels.items(), strict=True):
        for i, (label, schedule) in enumerate(curves.items()):
            values = np.asarray(jax.vmap(schedule)(steps))
            ax.plot(steps, values, ["-", "--", ":"][i], label=label, linewidth=1.6)
        ax.set_title(f"schedules.{title}", fontsize=11)
        ax.set_ylim(-0.05, 1.1)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("learning rate (initial = 1)")
    fig.suptitle("kopt.schedules: every schedule, initial learning rate 1.0")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps on the x axis")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to save the plot")
    args = parser.parse_args(argv)
    if args.steps < 4:
        parser.error("--steps must be >= 4")
    plot(args.steps, args.out)
    print(f"saved {len(gallery(args.steps))} schedule panels to {args.out}")


if __name__ == "__main__":
    main()

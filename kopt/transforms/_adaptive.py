"""Adaptive scalings: Adam, Adagrad, Adadelta, Adamax, Nadam (Keras-exact), Lion and Lamb.

Each piece returns the step *direction* (before the learning rate); the optimizers in
:mod:`kopt.alias` chain it with :func:`kopt.scale_by_learning_rate`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kopt._tree import abs_sq, at_least_float32
from kopt.base import GradientTransformation, check_flag, check_hyperparam, check_slot_dtype
from kopt.sparse import (
    IndexedSlices,
    as_dense,
    deduplicate,
    gather_rows,
    scatter_add_rows,
    scatter_rows,
)
from kopt.transforms._core import (
    cast_coefficients,
    constant_slot,
    leafwise_transformation,
)


def _check_betas(owner, **betas):
    for name, value in betas.items():
        check_hyperparam(owner, name, value, low=0.0, high=1.0)


def _narrow(dtype: Any) -> bool:
    """Whether slots of ``dtype`` (float16, bfloat16) are narrower than float32."""
    return jnp.finfo(dtype).bits < 32


def _rounded_betas(c: dict[str, Any], dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``beta_1`` and ``beta_2`` as the moments in ``dtype`` use them (rounded to it), in
    float32, for the bias corrections: those must decay with the moments they correct. In
    bfloat16 ``0.999`` rounds to 1, so ``v`` never moves, and a float32 correction
    ``sqrt(1 - 0.999**t)`` would divide a first moment by a zero ``v`` (steps of 1e4 learning
    rates) where the slot-dtype one is 0, as in tf.keras (no step)."""
    return tuple(jnp.asarray(c[k]).astype(dtype).astype(jnp.float32) for k in ("beta_1", "beta_2"))


def scale_by_adam(
    beta_1: Any = 0.9,
    beta_2: Any = 0.999,
    epsilon: Any = 1e-7,
    amsgrad: bool = False,
    slot_dtype: Any = None,
) -> GradientTransformation:
    r"""Adam's direction with Keras's "epsilon hat" placement.

    .. math::
        m \leftarrow m + (g - m)(1 - \beta_1),\quad v \leftarrow v + (|g|^2 - v)(1 - \beta_2),\quad
        u = \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\,\frac{m}{\sqrt{v} + \epsilon}

    With ``amsgrad``, ``vhat = max(vhat, v)`` (of the raw ``v``) replaces ``v`` in the root.
    A sparse gradient decays every row's moments and adds its rows (duplicates summed first),
    as Keras's sparse path does, without building a table-sized gradient.
    Slots: ``m``, ``v`` and, with amsgrad, ``vhat``. Reference: Kingma and Ba, 2014.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.scale_by_adam()
        >>> u, _ = tx.update(jnp.array([0.5]), tx.init(jnp.zeros(1)))
        >>> bool(jnp.allclose(u, 1.0, atol=1e-5))
        True
    """
    owner = "scale_by_adam"
    check_slot_dtype(owner, slot_dtype)
    _check_betas(owner, beta_1=beta_1, beta_2=beta_2)
    check_hyperparam(owner, "epsilon", epsilon)
    check_flag(owner, "amsgrad", amsgrad)
    slots = {"m": constant_slot(0.0, slot_dtype), "v": constant_slot(0.0, slot_dtype)}
    if amsgrad:
        slots["vhat"] = constant_slot(0.0, slot_dtype)

    def prepare(hp, step, scalars):
        t = step + 1.0
        correction = jnp.sqrt(1.0 - hp["beta_2"] ** t) / (1.0 - hp["beta_1"] ** t)
        return {**hp, "t": t, "correction": correction}, scalars

    def rule(g, s, p, c):
        m, v = s["m"], s["v"]
        if _narrow(m.dtype):
            b1, b2 = _rounded_betas(c, m.dtype)
            c = {**c, "correction": jnp.sqrt(1.0 - b2 ** c["t"]) / (1.0 - b1 ** c["t"])}
        c = cast_coefficients(c, m.dtype)
        if isinstance(g, IndexedSlices):  # Keras's sparse path: decay every row, add the rows
            d = deduplicate(g, m.shape[0])
            rows = d.values.astype(m.dtype)
            m = scatter_add_rows(m * c["beta_1"], d.indices, rows * (1 - c["beta_1"]))
            v = scatter_add_rows(v * c["beta_2"], d.indices, abs_sq(rows) * (1 - c["beta_2"]))
        else:
            g = g.astype(m.dtype)
            m = m + (g - m) * (1 - c["beta_1"])
            v = v + (abs_sq(g) - v) * (1 - c["beta_2"])
        new = {"m": m, "v": v}
        if amsgrad:
            new["vhat"] = v = jnp.maximum(s["vhat"], v)
        return (m * c["correction"]) / (jnp.sqrt(v) + c["epsilon"]), new

    return leafwise_transformation(
        owner,
        {"beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon},
        slots,
        rule,
        prepare=prepare,
    )


def scale_by_adagrad(
    initial_accumulator_value: float = 0.1, epsilon: Any = 1e-7, slot_dtype: Any = None
) -> GradientTransformation:
    r"""Adagrad's direction: ``accumulator += |g|**2``; ``u = g / (sqrt(accumulator) + epsilon)``.

    Sparse gradients update only the rows they name (duplicates summed first). Slot:
    ``accumulator``, starting at ``initial_accumulator_value`` (0.1, as in Keras).
    Reference: Duchi et al., 2011.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.scale_by_adagrad(initial_accumulator_value=0.0, epsilon=0.0)
        >>> tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))[0]
        Array([1.], dtype=float32)
    """
    owner = "scale_by_adagrad"
    check_slot_dtype(owner, slot_dtype)
    check_hyperparam(
        owner, "initial_accumulator_value", initial_accumulator_value, allow_schedule=False
    )
    check_hyperparam(owner, "epsilon", epsilon)

    def step(g, acc, c):
        acc = acc + abs_sq(g)
        return g / (jnp.sqrt(acc) + c["epsilon"]), acc

    def rule(g, s, p, c):
        acc = s["accumulator"]
        c = cast_coefficients(c, acc.dtype)
        if isinstance(g, IndexedSlices):
            d = deduplicate(g, acc.shape[0])
            rows, acc_rows = step(d.values.astype(acc.dtype), gather_rows(acc, d.indices), c)
            return (
                IndexedSlices(rows, d.indices, acc.shape),
                {"accumulator": scatter_rows(acc, d.indices, acc_rows)},
            )
        u, acc = step(g.astype(acc.dtype), acc, c)
        return u, {"accumulator": acc}

    return leafwise_transformation(
        owner,
        {"epsilon": epsilon},
        {"accumulator": constant_slot(initial_accumulator_value, slot_dtype)},
        rule,
    )


def scale_by_adadelta(
    rho: Any = 0.95, epsilon: Any = 1e-7, slot_dtype: Any = None
) -> GradientTransformation:
    r"""Adadelta's direction, epsilon inside both roots (Keras-exact).

    .. math::
        a_g \leftarrow \rho a_g + (1-\rho) |g|^2,\quad
        u = \sqrt{a_x + \epsilon}\,/\sqrt{a_g + \epsilon}\; g,\quad
        a_x \leftarrow \rho a_x + (1-\rho) |u|^2

    Slots ``accum_grad`` and ``accum_var``. Sparse gradients update only their rows.
    Reference: Zeiler, 2012.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.scale_by_adadelta()
        >>> u, s = tx.update(jnp.array([1.0]), tx.init(jnp.zeros(1)))
        >>> kopt.get_slot(s, "accum_grad")  # (1 - rho) * g**2, with 1 - rho in float32
        Array([0.05000001], dtype=float32)
    """
    owner = "scale_by_adadelta"
    check_slot_dtype(owner, slot_dtype)
    check_hyperparam(owner, "rho", rho, high=1.0)
    check_hyperparam(owner, "epsilon", epsilon)

    def step(g, ag, av, c):
        ag = ag * c["rho"] + abs_sq(g) * (1 - c["rho"])
        u = jnp.sqrt(av + c["epsilon"]) * jax.lax.rsqrt(ag + c["epsilon"]) * g
        av = av * c["rho"] + abs_sq(u) * (1 - c["rho"])
        return u, ag, av

    def rule(g, s, p, c):
        ag, av = s["accum_grad"], s["accum_var"]
        c = cast_coefficients(c, ag.dtype)
        if isinstance(g, IndexedSlices):
            d = deduplicate(g, ag.shape[0])
            u, ag_rows, av_rows = step(
                d.values.astype(ag.dtype), gather_rows(ag, d.indices), gather_rows(av, d.indices), c
            )
            return IndexedSlices(u, d.indices, ag.shape), {
                "accum_grad": scatter_rows(ag, d.indices, ag_rows),
                "accum_var": scatter_rows(av, d.indices, av_rows),
            }
        u, ag, av = step(g.astype(ag.dtype), ag, av, c)
        return u, {"accum_grad": ag, "accum_var": av}

    return leafwise_transformation(
        owner,
        {"rho": rho, "epsilon": epsilon},
        {"accum_grad": constant_slot(0.0, slot_dtype), "accum_var": constant_slot(0.0, slot_dtype)},
        rule,
    )


def scale_by_adamax(
    beta_1: Any = 0.9, beta_2: Any = 0.999, epsilon: Any = 1e-7, slot_dtype: Any = None
) -> GradientTransformation:
    r"""Adamax's direction (infinity-norm Adam), Keras-exact.

    .. math::
        m \leftarrow m + (g - m)(1-\beta_1),\quad v \leftarrow \max(\beta_2 v, |g|),\quad
        u = \frac{m / (v + \epsilon)}{1 - \beta_1^t}

    Slots ``m`` and ``v``. Sparse gradients move only their rows (slots and params), as Keras's
    sparse rule does. Reference: Kingma and Ba, 2014, section 7.1.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.scale_by_adamax(epsilon=0.0)
        >>> tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))[0]
        Array([1.], dtype=float32)
    """
    owner = "scale_by_adamax"
    check_slot_dtype(owner, slot_dtype)
    _check_betas(owner, beta_1=beta_1, beta_2=beta_2)
    check_hyperparam(owner, "epsilon", epsilon)

    def prepare(hp, step, scalars):
        t = step + 1.0
        return {**hp, "t": t, "one_minus_beta_1_power": 1.0 - hp["beta_1"] ** t}, scalars

    def rule(g, s, p, c):
        m, v = s["m"], s["v"]
        if _narrow(m.dtype):  # m's correction with the beta_1 that m decays by
            b1 = _rounded_betas(c, m.dtype)[0]
            c = {**c, "one_minus_beta_1_power": 1.0 - b1 ** c["t"]}
        c = cast_coefficients(c, m.dtype)
        if isinstance(g, IndexedSlices):
            d = deduplicate(g, m.shape[0])
            gv = d.values.astype(m.dtype)
            m_rows = c["beta_1"] * gather_rows(m, d.indices) + (1 - c["beta_1"]) * gv
            v_rows = jnp.maximum(c["beta_2"] * gather_rows(v, d.indices), jnp.abs(gv))
            u = m_rows / (v_rows + c["epsilon"]) / c["one_minus_beta_1_power"]
            return IndexedSlices(u, d.indices, m.shape), {
                "m": scatter_rows(m, d.indices, m_rows),
                "v": scatter_rows(v, d.indices, v_rows),
            }
        g = g.astype(m.dtype)
        m = m + (g - m) * (1 - c["beta_1"])
        v = jnp.maximum(c["beta_2"] * v, jnp.abs(g))
        return m / (v + c["epsilon"]) / c["one_minus_beta_1_power"], {"m": m, "v": v}

    return leafwise_transformation(
        owner,
        {"beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon},
        {"m": constant_slot(0.0, slot_dtype), "v": constant_slot(0.0, slot_dtype)},
        rule,
        prepare=prepare,
    )


def scale_by_nadam(
    beta_1: Any = 0.9,
    beta_2: Any = 0.999,
    epsilon: Any = 1e-7,
    schedule_decay: Any = 0.004,
    slot_dtype: Any = None,
) -> GradientTransformation:
    r"""Nadam's direction with Keras's momentum-cache schedule (Dozat, 2015).

    With :math:`\mu_t = \beta_1 (1 - 0.5 \cdot 0.96^{\psi t})` (``psi = schedule_decay``) and the
    running product :math:`\Pi_t = \prod_{i \le t} \mu_i` (scalar slot ``momentum_cache``):

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) |g|^2,\\
        \bar m = (1-\mu_t)\frac{g}{1-\Pi_t} + \mu_{t+1}\frac{m}{1-\Pi_t\mu_{t+1}},\quad
        u = \frac{\bar m}{\sqrt{v / (1-\beta_2^t)} + \epsilon}

    Sparse gradients decay ``m`` and ``v`` on every row and move only the named rows of the
    param, as Keras does.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.scale_by_nadam()
        >>> _, s = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
        >>> round(float(kopt.get_slot(s, "momentum_cache")), 6)  # 0.9 * (1 - 0.5 * 0.96**0.004)
        0.450073
    """
    owner = "scale_by_nadam"
    check_slot_dtype(owner, slot_dtype)
    _check_betas(owner, beta_1=beta_1, beta_2=beta_2)
    check_hyperparam(owner, "epsilon", epsilon)
    check_hyperparam(owner, "schedule_decay", schedule_decay)

    def prepare(hp, step, scalars):
        t = step + 1.0
        mu_t = hp["beta_1"] * (1.0 - 0.5 * 0.96 ** (hp["schedule_decay"] * t))
        mu_next = hp["beta_1"] * (1.0 - 0.5 * 0.96 ** (hp["schedule_decay"] * (t + 1.0)))
        schedule_new = scalars["momentum_cache"] * mu_t
        coeffs = {
            **hp,
            "mu_t": mu_t,
            "mu_next": mu_next,
            "one_minus_schedule_new": 1.0 - schedule_new,
            "one_minus_schedule_next": 1.0 - schedule_new * mu_next,
            "v_denominator": 1.0 - hp["beta_2"] ** t,
            "t": t,
        }
        return coeffs, {"momentum_cache": schedule_new}

    def direction(g, m_rows, v_rows, c):
        g_prime = g / c["one_minus_schedule_new"]
        m_prime = m_rows / c["one_minus_schedule_next"]
        v_prime = v_rows / c["v_denominator"]
        m_bar = (1 - c["mu_t"]) * g_prime + c["mu_next"] * m_prime
        return m_bar / (jnp.sqrt(v_prime) + c["epsilon"])

    def rule(g, s, p, c):
        m, v = s["m"], s["v"]
        if _narrow(m.dtype):  # v's correction with the beta_2 that v decays by
            c = {**c, "v_denominator": 1.0 - _rounded_betas(c, m.dtype)[1] ** c["t"]}
        c = cast_coefficients(c, m.dtype)
        if isinstance(g, IndexedSlices):
            d = deduplicate(g, m.shape[0])
            gv = d.values.astype(m.dtype)
            m = scatter_add_rows(m * c["beta_1"], d.indices, gv * (1 - c["beta_1"]))
            v = scatter_add_rows(v * c["beta_2"], d.indices, abs_sq(gv) * (1 - c["beta_2"]))
            u = direction(gv, gather_rows(m, d.indices), gather_rows(v, d.indices), c)
            return IndexedSlices(u, d.indices, m.shape), {"m": m, "v": v}
        g = g.astype(m.dtype)
        m = c["beta_1"] * m + (1 - c["beta_1"]) * g
        v = c["beta_2"] * v + (1 - c["beta_2"]) * abs_sq(g)
        return direction(g, m, v, c), {"m": m, "v": v}

    return leafwise_transformation(
        owner,
        {"beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon, "schedule_decay": schedule_decay},
        {"m": constant_slot(0.0, slot_dtype), "v": constant_slot(0.0, slot_dtype)},
        rule,
        prepare=prepare,
        scalar_slots={"momentum_cache": 1.0},
    )


def scale_by_lion(
    beta_1: Any = 0.9, beta_2: Any = 0.99, slot_dtype: Any = None
) -> GradientTransformation:
    r"""Lion's direction (Keras 3): ``u = sign(beta_1 m + (1 - beta_1) g)``; then
    ``m = beta_2 m + (1 - beta_2) g``.

    Slot ``m``. ``beta_1`` must lie in (0, 1] (0 degenerates to sign SGD). For a complex
    param, ``sign(x)`` is ``x / |x|`` (0 at 0), as in optax's ``lion``. Reference: Chen et
    al., 2023, "Symbolic Discovery of Optimization Algorithms".

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.scale_by_lion()
        >>> tx.update(jnp.array([0.3, -2.0]), tx.init(jnp.zeros(2)))[0]
        Array([ 1., -1.], dtype=float32)
    """
    owner = "scale_by_lion"
    check_slot_dtype(owner, slot_dtype)
    check_hyperparam(owner, "beta_1", beta_1, low=0.0, low_inclusive=False, high=1.0)
    check_hyperparam(owner, "beta_2", beta_2, high=1.0)

    def rule(g, s, p, c):
        m = s["m"]
        g = as_dense(g, m.shape).astype(m.dtype)
        c = cast_coefficients(c, m.dtype)
        u = jnp.sign(m * c["beta_1"] + g * (1.0 - c["beta_1"]))
        return u, {"m": m * c["beta_2"] + g * (1.0 - c["beta_2"])}

    return leafwise_transformation(
        owner, {"beta_1": beta_1, "beta_2": beta_2}, {"m": constant_slot(0.0, slot_dtype)}, rule
    )


def scale_by_lamb(
    beta_1: Any = 0.9, beta_2: Any = 0.999, epsilon: Any = 1e-7, slot_dtype: Any = None
) -> GradientTransformation:
    r"""Lamb's direction (Keras 3): Adam's bias-corrected step times a per-tensor trust ratio.

    .. math::
        r = \frac{m/(1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)} + \epsilon},\quad
        u = \frac{\lVert w \rVert}{\lVert r \rVert}\, r

    (ratio 1 where either norm is 0). Needs ``params``. Slots ``m`` and ``v``.
    Reference: You et al., 2019.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.scale_by_lamb()
        >>> w = jnp.array([3.0, 4.0])
        >>> u, _ = tx.update(jnp.array([1.0, 0.0]), tx.init(w), w)
        >>> bool(jnp.allclose(jnp.linalg.norm(u), 5.0))
        True
    """
    owner = "scale_by_lamb"
    check_slot_dtype(owner, slot_dtype)
    _check_betas(owner, beta_1=beta_1, beta_2=beta_2)
    check_hyperparam(owner, "epsilon", epsilon)

    def prepare(hp, step, scalars):
        t = step + 1.0
        return {
            **hp,
            "one_minus_beta_1_power": 1.0 - hp["beta_1"] ** t,
            "one_minus_beta_2_power": 1.0 - hp["beta_2"] ** t,
        }, scalars

    def rule(g, s, p, c):
        m, v = s["m"], s["v"]
        g = as_dense(g, m.shape).astype(m.dtype)
        c32 = cast_coefficients(c, jnp.float32)
        # `1 - beta` taken before rounding to the slots' dtype, as Keras 3 does (bfloat16
        # rounds 0.999 to 1, which would leave `v` at 0 while the bias correction, in float32,
        # is not 0: the step would be m / epsilon, normalised, and no longer Lamb's).
        m = m + (g - m) * (1 - c32["beta_1"]).astype(m.dtype)
        v = v + (abs_sq(g) - v) * (1 - c32["beta_2"]).astype(m.dtype)
        # The slots keep their dtype; the ratio and the norms are computed in at least float32
        # (as global_norm is). In float16 an epsilon of 1e-7 is subnormal, which XLA may flush to
        # zero, and a sum of squares overflows long before the update itself is out of range.
        m32, v32 = at_least_float32(m), at_least_float32(v)
        r = (m32 / c32["one_minus_beta_1_power"]) / (
            jnp.sqrt(v32 / c32["one_minus_beta_2_power"]) + c32["epsilon"]
        )
        w_norm = jnp.sqrt(jnp.sum(abs_sq(at_least_float32(p.astype(m.dtype)))))
        r_norm = jnp.sqrt(jnp.sum(abs_sq(r)))
        ratio = jnp.where(w_norm > 0, jnp.where(r_norm > 0, w_norm / r_norm, 1.0), 1.0)
        return (ratio * r).astype(m.dtype), {"m": m, "v": v}

    return leafwise_transformation(
        owner,
        {"beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon},
        {"m": constant_slot(0.0, slot_dtype), "v": constant_slot(0.0, slot_dtype)},
        rule,
        prepare=prepare,
        needs_params=True,
        per_tensor=True,
    )

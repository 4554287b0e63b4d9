"""SGD and RMSprop as Keras runs them: the learning rate sits inside the momentum."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from kopt._tree import abs_sq, at_least_float32, reduced_like_param
from kopt.base import GradientTransformation, check_flag, check_hyperparam, check_slot_dtype
from kopt.sparse import (
    IndexedSlices,
    deduplicate,
    gather_rows,
    scatter_add_rows,
    scatter_rows,
)
from kopt.transforms._core import (
    cast_coefficients,
    constant_slot,
    leafwise_transformation,
    learning_rate_at,
)


def uses_momentum(momentum: Any) -> bool:
    """Keras's rule, fixed at construction: an array or schedule, or a number above 0."""
    if isinstance(momentum, (int, float)):
        return momentum > 0
    return True


def _learning_rate_prepare(hp, step, scalars):
    return {**hp, "lr": learning_rate_at(hp, step)}, scalars


def _check_momentum(owner, momentum):
    check_hyperparam(owner, "momentum", momentum, low=0.0, high=1.0)


def scale_by_sgd(
    learning_rate: Any = 0.01,
    momentum: Any = 0.0,
    nesterov: bool = False,
    decay: Any = 0.0,
    slot_dtype: Any = None,
) -> GradientTransformation:
    r"""Keras's SGD step, learning rate included (returns the full update).

    Without momentum ``u = -lr_t g``. With momentum (slot ``momentum``):

    .. math::
        a \leftarrow \mu a - lr_t\, g,\qquad u = a \;\;(\text{Nesterov: } u = \mu a - lr_t\, g)

    Momentum is on when ``momentum`` is an array, a schedule or a number above 0, decided here
    once (as in Keras). Sparse gradients move only their rows; without momentum duplicates are
    scatter-added, with momentum they are summed first.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.scale_by_sgd(learning_rate=0.1, momentum=0.9)
        >>> s = tx.init(jnp.zeros(1))
        >>> u, s = tx.update(jnp.ones(1), s)
        >>> u, s = tx.update(jnp.ones(1), s)
        >>> u
        Array([-0.19], dtype=float32)
    """
    owner = "scale_by_sgd"
    check_slot_dtype(owner, slot_dtype)
    check_hyperparam(owner, "learning_rate", learning_rate)
    check_hyperparam(owner, "decay", decay)
    _check_momentum(owner, momentum)
    check_flag(owner, "nesterov", nesterov)
    with_momentum = uses_momentum(momentum)
    hyper = {"learning_rate": learning_rate, "decay": decay, "momentum": momentum}

    def momentum_step(g, accum, c):
        accum = accum * c["momentum"] - g * c["lr"]
        u = accum * c["momentum"] - g * c["lr"] if nesterov else accum
        return u, accum

    def rule(g, s, p, c):
        if not with_momentum:
            if isinstance(g, IndexedSlices):
                lr = c["lr"].astype(g.values.dtype)
                return IndexedSlices(-g.values * lr, g.indices, g.dense_shape), {}
            return -g * c["lr"].astype(g.dtype), {}
        accum = s["momentum"]
        c = cast_coefficients(c, accum.dtype)
        if isinstance(g, IndexedSlices):
            d = deduplicate(g, accum.shape[0])
            u, rows = momentum_step(d.values.astype(accum.dtype), gather_rows(accum, d.indices), c)
            return (
                IndexedSlices(u, d.indices, accum.shape),
                {"momentum": scatter_rows(accum, d.indices, rows)},
            )
        u, accum = momentum_step(g.astype(accum.dtype), accum, c)
        return u, {"momentum": accum}

    slots = {"momentum": constant_slot(0.0, slot_dtype)} if with_momentum else {}
    return leafwise_transformation(owner, hyper, slots, rule, prepare=_learning_rate_prepare)


def _centered_variance(ms, mg):
    """Centered RMSprop's ``ms - |mg|**2``, rounded as Keras rounds it and never below 0.

    It is at least 0 in exact arithmetic (``ms`` and ``mg`` average ``|g|**2`` and ``g`` with the
    same weights) and exactly 0 with ``rho=0`` (``ms = |g|**2``, ``mg = g``), where Keras divides
    by epsilon. Under ``jax.jit`` XLA contracted ``ms - mg * mg`` into a fused multiply-add,
    which leaves the product unrounded, so that 0 came out as rounding noise of either sign:
    NaN from the root of a negative, a step thousands of times too small from a positive.
    The square goes through ``maximum(., 0)`` (the same value) so that it is rounded before the
    subtraction, and the difference is clamped at 0 for any rounding left.
    """
    return jnp.maximum(ms - jnp.maximum(abs_sq(mg), 0), 0)


def scale_by_rmsprop(
    learning_rate: Any = 0.001,
    rho: Any = 0.9,
    momentum: Any = 0.0,
    epsilon: Any = 1e-7,
    centered: bool = False,
    decay: Any = 0.0,
    slot_dtype: Any = None,
) -> GradientTransformation:
    r"""Keras's RMSprop step, learning rate included, with both epsilon placements.

    Without momentum (epsilon outside the root):

    .. math::
        s \leftarrow \rho s + (1-\rho) |g|^2,\quad
        u = -\frac{lr_t\, g}{\sqrt{s - |\bar g|^2} + \epsilon}

    With momentum (epsilon inside the root, slot ``momentum``):

    .. math:: a \leftarrow \mu a + \frac{lr_t\, g}{\sqrt{s - |\bar g|^2 + \epsilon}},\quad u = -a

    where :math:`\bar g` (slot ``mg``, only when ``centered``) is the running mean gradient.
    Slots ``rms``, ``momentum``, ``mg``. Sparse: with momentum only the named rows move; without
    it ``rms``/``mg`` decay on every row and the param moves only on the named rows (Keras).
    Reference: Hinton, Coursera lecture 6e.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.scale_by_rmsprop(learning_rate=1.0, epsilon=0.0)
        >>> u, _ = tx.update(jnp.ones(1), tx.init(jnp.zeros(1)))
        >>> round(float(u[0]), 5)  # -1 / sqrt(1 - rho)
        -3.16228
    """
    owner = "scale_by_rmsprop"
    check_slot_dtype(owner, slot_dtype)
    check_hyperparam(owner, "learning_rate", learning_rate)
    check_hyperparam(owner, "decay", decay)
    check_hyperparam(owner, "rho", rho, high=1.0)
    check_hyperparam(owner, "epsilon", epsilon)
    _check_momentum(owner, momentum)
    check_flag(owner, "centered", centered)
    with_momentum = uses_momentum(momentum)
    hyper = {
        "learning_rate": learning_rate,
        "decay": decay,
        "rho": rho,
        "momentum": momentum,
        "epsilon": epsilon,
    }

    def fused_step(g, ms, mg, mom, c):
        ms = ms + (abs_sq(g) - ms) * (1 - c["rho"])
        if centered:
            mg = mg + (g - mg) * (1 - c["rho"])
            denom = _centered_variance(ms, mg) + c["epsilon"]
        else:
            denom = ms + c["epsilon"]
        mom = mom * c["momentum"] + (g * c["lr"]) / jnp.sqrt(denom)
        return -mom, ms, mg, mom

    def rule(g, s, p, c):
        rms = s["rms"]
        mg = s.get("mg")
        c = cast_coefficients(c, rms.dtype)
        new = {}
        if with_momentum:
            mom = s["momentum"]
            if isinstance(g, IndexedSlices):
                d = deduplicate(g, rms.shape[0])
                idx = d.indices
                u, ms_r, mg_r, mom_r = fused_step(
                    d.values.astype(rms.dtype),
                    gather_rows(rms, idx),
                    gather_rows(mg, idx) if centered else None,
                    gather_rows(mom, idx),
                    c,
                )
                new = {
                    "rms": scatter_rows(rms, idx, ms_r),
                    "momentum": scatter_rows(mom, idx, mom_r),
                }
                if centered:
                    new["mg"] = scatter_rows(mg, idx, mg_r)
                return IndexedSlices(u, idx, rms.shape), new
            u, ms, mg, mom = fused_step(g.astype(rms.dtype), rms, mg, mom, c)
            new = {"rms": ms, "momentum": mom}
            if centered:
                new["mg"] = mg
            return u, new
        if isinstance(g, IndexedSlices):
            d = deduplicate(g, rms.shape[0])
            gv, idx = d.values.astype(rms.dtype), d.indices
            rms = scatter_add_rows(rms * c["rho"], idx, (1 - c["rho"]) * abs_sq(gv))
            denom = gather_rows(rms, idx)
            new = {"rms": rms}
            if centered:
                mg = scatter_add_rows(mg * c["rho"], idx, (1 - c["rho"]) * gv)
                denom = _centered_variance(denom, gather_rows(mg, idx))
                new["mg"] = mg
            u = -(c["lr"] * gv) / (jnp.sqrt(denom) + c["epsilon"])
            return IndexedSlices(u, idx, rms.shape), new
        g = g.astype(rms.dtype)
        rms = c["rho"] * rms + (1 - c["rho"]) * abs_sq(g)
        denom = rms
        new = {"rms": rms}
        if centered:
            mg = c["rho"] * mg + (1 - c["rho"]) * g
            denom = _centered_variance(rms, mg)
            new["mg"] = mg
        return -(c["lr"] * g) / (jnp.sqrt(denom) + c["epsilon"]), new

    slots = {"rms": constant_slot(0.0, slot_dtype)}
    if with_momentum:
        slots["momentum"] = constant_slot(0.0, slot_dtype)
    if centered:
        slots["mg"] = constant_slot(0.0, slot_dtype)
    return leafwise_transformation(owner, hyper, slots, rule, prepare=_learning_rate_prepare)


def scale_by_ftrl(
    learning_rate: Any = 0.001,
    learning_rate_power: Any = -0.5,
    initial_accumulator_value: float = 0.1,
    l1_regularization_strength: Any = 0.0,
    l2_regularization_strength: Any = 0.0,
    beta: Any = 0.0,
    l2_shrinkage_regularization_strength: Any = 0.0,
    decay: Any = 0.0,
    slot_dtype: Any = None,
) -> GradientTransformation:
    r"""Keras's FTRL-Proximal step (McMahan et al., 2013), returned as ``new_param - param``.

    With :math:`p` = ``-learning_rate_power``, :math:`g_s = g + 2\lambda_s w` (shrinkage) and
    :math:`\lambda_2' = \lambda_2 + \beta / (2 lr_t)`:

    .. math::
        n' = n + g^2,\quad z \leftarrow z + g_s - \frac{n'^{p} - n^{p}}{lr_t} w,\quad
        w' = \frac{\mathrm{clip}(z, -\lambda_1, \lambda_1) - z}{n'^{p}/lr_t + 2\lambda_2'}

    Slots ``accumulator`` (starts at ``initial_accumulator_value``) and ``linear``. Needs
    ``params``. Sparse gradients move only their rows. Complex params are refused (TypeError
    at ``init``): the rule clips ``z`` and compares ``|z|`` with :math:`\lambda_1`.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.scale_by_ftrl(learning_rate=0.1, l1_regularization_strength=10.0)
        >>> w = jnp.ones(2)
        >>> u, _ = tx.update(jnp.ones(2), tx.init(w), w)
        >>> kopt.apply_updates(w, u)  # strong L1 drives the weights to exactly 0
        Array([0., 0.], dtype=float32)
    """
    owner = "scale_by_ftrl"
    check_slot_dtype(owner, slot_dtype)
    check_hyperparam(owner, "learning_rate", learning_rate)
    check_hyperparam(owner, "decay", decay)
    check_hyperparam(owner, "learning_rate_power", learning_rate_power, low=None, high=0.0)
    check_hyperparam(
        owner, "initial_accumulator_value", initial_accumulator_value, allow_schedule=False
    )
    for name, value in (
        ("l1_regularization_strength", l1_regularization_strength),
        ("l2_regularization_strength", l2_regularization_strength),
        ("beta", beta),
        ("l2_shrinkage_regularization_strength", l2_shrinkage_regularization_strength),
    ):
        check_hyperparam(owner, name, value)
    hyper = {
        "learning_rate": learning_rate,
        "decay": decay,
        "learning_rate_power": learning_rate_power,
        "l1_regularization_strength": l1_regularization_strength,
        "l2_regularization_strength": l2_regularization_strength,
        "beta": beta,
        "l2_shrinkage_regularization_strength": l2_shrinkage_regularization_strength,
    }

    def prepare(hp, step, scalars):
        lr = learning_rate_at(hp, step)
        l2_adjusted = hp["l2_regularization_strength"] + hp["beta"] / (2.0 * lr)
        return {**hp, "lr": lr, "l2_adjusted": l2_adjusted}, scalars

    def ftrl_step(g, w, acc, linear, c):
        power = -c["learning_rate_power"]
        root = lambda x: jnp.where(power == 0.5, jnp.sqrt(x), x**power)  # noqa: E731
        g_shrunk = g + 2 * c["l2_shrinkage_regularization_strength"] * w
        new_acc = acc + g * g
        linear = linear + g_shrunk - (root(new_acc) - root(acc)) / c["lr"] * w
        l1 = c["l1_regularization_strength"]
        numerator = jnp.clip(linear, -l1, l1) - linear
        quadratic = root(new_acc) / c["lr"] + 2 * c["l2_adjusted"]
        # As Keras's kernel: 0 where |linear| <= l1 (also when quadratic is 0: no 0 / 0).
        new_w = jnp.where(jnp.abs(linear) > l1, numerator / quadratic, 0.0)
        return new_w - w, new_acc, linear

    def rule(g, s, p, c):
        acc, linear = s["accumulator"], s["linear"]
        c = cast_coefficients(c, acc.dtype)
        if isinstance(g, IndexedSlices):
            d = deduplicate(g, acc.shape[0])
            idx = d.indices
            u, acc_r, lin_r = ftrl_step(
                d.values.astype(acc.dtype),
                gather_rows(p, idx).astype(acc.dtype),
                gather_rows(acc, idx),
                gather_rows(linear, idx),
                c,
            )
            return IndexedSlices(u, idx, acc.shape), {
                "accumulator": scatter_rows(acc, idx, acc_r),
                "linear": scatter_rows(linear, idx, lin_r),
            }
        u, acc, linear = ftrl_step(g.astype(acc.dtype), p.astype(acc.dtype), acc, linear, c)
        return u, {"accumulator": acc, "linear": linear}

    return leafwise_transformation(
        owner,
        hyper,
        {
            "accumulator": constant_slot(initial_accumulator_value, slot_dtype),
            "linear": constant_slot(0.0, slot_dtype),
        },
        rule,
        prepare=prepare,
        needs_params=True,
        supports_complex=False,
    )


def scale_by_adafactor(
    learning_rate: Any = 0.001,
    beta_2_decay: Any = -0.8,
    epsilon_1: Any = 1e-30,
    epsilon_2: Any = 1e-3,
    clip_threshold: Any = 1.0,
    relative_step: bool = True,
    *,
    slot_dtype: Any = None,
) -> GradientTransformation:
    r"""Keras 3's Adafactor step, learning rate included (Shazeer and Stern, 2018).

    With :math:`\rho_t = \min(lr, 1/\sqrt{t})`, :math:`\hat\beta_{2t} = 1 - t^{c}`
    (``c = beta_2_decay``) and :math:`G = |g|^2 + \epsilon_1`: a param of rank >= 2 keeps factored
    row and column means (slots ``r``, ``c``) of ``G`` over its last two axes and
    :math:`v = (r / \bar r) \otimes c`; a smaller param keeps ``v`` itself. Then

    .. math::
        u_t = g / \sqrt{v},\quad
        u = -\max(\epsilon_2, \mathrm{RMS}(w))\,\rho_t\, \frac{u_t}{\max(1, \mathrm{RMS}(u_t)/d)}

    (``d = clip_threshold``). ``relative_step`` is kept for Keras compatibility: since
    :math:`\rho_t` already takes the minimum with :math:`1/\sqrt{t}`, it changes nothing, as in
    Keras 3. Slots ``r``, ``c`` (scalars for params of rank < 2) and ``v``, in ``slot_dtype``
    (default: each param's); the step is computed in the slots' dtype and rounded once into
    the param's. Needs ``params``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.scale_by_adafactor(learning_rate=1.0)
        >>> w = jnp.ones((2, 2))
        >>> u, _ = tx.update(jnp.ones((2, 2)), tx.init(w), w)
        >>> u
        Array([[-1., -1.],
               [-1., -1.]], dtype=float32)
    """
    owner = "scale_by_adafactor"
    check_hyperparam(owner, "learning_rate", learning_rate)
    check_hyperparam(owner, "beta_2_decay", beta_2_decay, low=None, high=0.0)
    check_hyperparam(owner, "epsilon_1", epsilon_1)
    check_hyperparam(owner, "epsilon_2", epsilon_2)
    check_hyperparam(owner, "clip_threshold", clip_threshold, low=0.0, low_inclusive=False)
    check_flag(owner, "relative_step", relative_step)
    check_slot_dtype(owner, slot_dtype, allow_complex=False)
    del relative_step
    hyper = {
        "learning_rate": learning_rate,
        "beta_2_decay": beta_2_decay,
        "epsilon_1": epsilon_1,
        "epsilon_2": epsilon_2,
        "clip_threshold": clip_threshold,
    }

    def prepare(hp, step, scalars):
        t = step + 1.0
        rho = jnp.minimum(hp["learning_rate"], 1.0 / jnp.sqrt(t))
        return {**hp, "rho": rho, "beta_2_t": 1.0 - t ** hp["beta_2_decay"]}, scalars

    def rms(x):  # accumulated in at least float32: a float16 mean of squares overflows early
        return jnp.sqrt(jnp.mean(abs_sq(at_least_float32(x)))).astype(x.dtype)

    def rule(g, s, p, c):
        v = s["v"]
        dtype = v.dtype
        g = (g.to_dense(v.shape) if isinstance(g, IndexedSlices) else g).astype(dtype)
        c = cast_coefficients(c, dtype)
        w = p.astype(dtype)
        alpha = jnp.maximum(c["epsilon_2"], rms(w)) * c["rho"]
        g2 = abs_sq(g) + c["epsilon_1"]
        b = c["beta_2_t"]
        new = {"r": s["r"], "c": s["c"]}
        if v.ndim >= 2:
            r = b * s["r"] + (1 - b) * jnp.mean(g2, axis=-1)
            col = b * s["c"] + (1 - b) * jnp.mean(g2, axis=-2)
            v = jnp.expand_dims(r / jnp.mean(r, axis=-1, keepdims=True), -1) * jnp.expand_dims(
                col, -2
            )
            new = {"r": r, "c": col}
        else:
            v = b * v + (1 - b) * g2
        # Where the factored moment underflows to 0 (a gradient row and column all zero:
        # about 1e-30 times 1e-30), Keras computes 0 / 0, and the NaN spreads through the RMS
        # clip to the whole tensor; the element's update is 0 instead (its gradient is 0).
        positive = v > 0
        u_t = jnp.where(positive, g / jnp.sqrt(jnp.where(positive, v, 1)), 0)
        u_hat = u_t / jnp.maximum(1.0, rms(u_t) / c["clip_threshold"])
        new["v"] = v
        return -(alpha * u_hat), new

    def factored_slot(axis):
        def make(p):
            # A param of fewer than two axes keeps a scalar in its place (Keras's layout).
            return reduced_like_param(p, axis if jnp.ndim(p) >= 2 else None, slot_dtype)

        return make

    return leafwise_transformation(
        owner,
        hyper,
        {"r": factored_slot(-1), "c": factored_slot(-2), "v": constant_slot(0.0, slot_dtype)},
        rule,
        prepare=prepare,
        needs_params=True,
        per_tensor=True,
    )

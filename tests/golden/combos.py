"""Combination cases for the golden fixtures: many options of one optimizer at once.

``generate.py`` imports this module and writes ``fixtures/combos.json``. Each case is drawn
from its own ``random.Random`` (seeded by the case number), so the cases are the same on
every run, and then run through tf.keras (legacy), tf.keras's ``LossScaleOptimizer`` or
Keras 3. A case records everything a replay needs: the constructor arguments, the learning
rate (a number, a schedule's config or a constant callable), the variables, and per step the
variables it updates, their gradients (dense, or rows for the sparse table), any attributes
assigned before it, and whether it goes through ``minimize`` (the loss is then
``sum(c * w * w)`` over the step's variables, with ``c`` stored as that step's gradient).
"""

from __future__ import annotations

import random

import keras
import numpy as np
import tensorflow as tf
import tf_keras
from common import case_rng, json_safe, legacy_expected, to_json_array

LEGACY = tf_keras.optimizers.legacy

SHAPES = [("w0", (3,)), ("w1", (2, 3)), ("emb", (6, 3))]
SPARSE_INDEX = 2
SPARSE_ROWS = 5  # the sparse gradients name rows 0-4; row 5 is never touched
KERAS3_SHAPES = [("bias", (3,)), ("kernel", (2, 3)), ("w3", (4, 2, 3))]
LEGACY_STEPS = 6
LSO_STEPS = 8
KERAS3_STEPS = 7

LEGACY_CLASSES = ["SGD", "Adam", "Adagrad", "Adadelta", "Adamax", "Nadam", "RMSprop", "Ftrl"]
LEGACY_SCHEDULES = [
    ("ExponentialDecay", {"initial_learning_rate": 0.1, "decay_steps": 2, "decay_rate": 0.5}),
    ("PiecewiseConstantDecay", {"boundaries": [1, 3], "values": [0.1, 0.05, 0.01]}),
    ("InverseTimeDecay", {"initial_learning_rate": 0.2, "decay_steps": 1, "decay_rate": 0.3}),
    (
        "PolynomialDecay",
        {"initial_learning_rate": 0.1, "decay_steps": 4, "end_learning_rate": 0.01, "power": 2.0},
    ),
    ("CosineDecay", {"initial_learning_rate": 0.1, "decay_steps": 5, "alpha": 0.1}),
    (
        "CosineDecayRestarts",
        {"initial_learning_rate": 0.1, "first_decay_steps": 2, "t_mul": 1.5, "m_mul": 0.8},
    ),
]
KERAS3_SCHEDULES = [
    ("ExponentialDecay", {"initial_learning_rate": 0.1, "decay_steps": 2, "decay_rate": 0.5}),
    ("CosineDecay", {"initial_learning_rate": 0.1, "decay_steps": 5, "alpha": 0.1}),
    ("PiecewiseConstantDecay", {"boundaries": [1, 3], "values": [0.1, 0.05, 0.01]}),
]
CALLABLE_RATE = 0.05


def _legacy_kwargs(r: random.Random, cls: str) -> dict:
    kw: dict = {}
    if r.random() < 0.7:
        kw["learning_rate"] = r.choice([0.1, 0.01, 0.5, 0.003])
    if cls == "SGD":
        if r.random() < 0.6:
            kw["momentum"] = r.choice([0.0, 0.5, 0.9])
        if r.random() < 0.4:
            kw["nesterov"] = True
    elif cls == "Adam":
        if r.random() < 0.4:
            kw["amsgrad"] = True
        if r.random() < 0.3:
            kw["beta_1"] = 0.8
        if r.random() < 0.3:
            kw["epsilon"] = r.choice([1e-3, 1e-8, 0.1])
    elif cls == "Adagrad":
        if r.random() < 0.5:
            kw["initial_accumulator_value"] = r.choice([0.0, 0.5, 1e-3])
        if r.random() < 0.3:
            kw["epsilon"] = 1e-3
    elif cls == "Adadelta":
        if r.random() < 0.5:
            kw["rho"] = 0.8
        if r.random() < 0.3:
            kw["epsilon"] = 1e-3
    elif cls == "Adamax":
        if r.random() < 0.3:
            kw["beta_2"] = 0.9
    elif cls == "Nadam":
        if r.random() < 0.3:
            kw["beta_1"] = 0.7
    elif cls == "RMSprop":
        if r.random() < 0.5:
            kw["centered"] = True
        if r.random() < 0.5:
            kw["momentum"] = r.choice([0.0, 0.5])
        if r.random() < 0.3:
            kw["rho"] = 0.7
    elif cls == "Ftrl":
        # learning_rate_power stays at -0.5 here: other powers go through `pow`, whose last
        # bit differs between Eigen's vectorised loop and XLA's, and FTRL's `linear` slot
        # amplifies that difference (`legacy_ftrl_lr_power` covers the other powers).
        if r.random() < 0.5:
            kw["l1_regularization_strength"] = 0.01
        if r.random() < 0.5:
            kw["l2_regularization_strength"] = 0.02
        if r.random() < 0.3:
            kw["l2_shrinkage_regularization_strength"] = 0.03
        if r.random() < 0.3:
            kw["beta"] = 0.2
        if r.random() < 0.3:
            kw["initial_accumulator_value"] = 0.3
    if r.random() < 0.3:
        kw["decay"] = r.choice([0.01, 0.1])
    _draw_clip(r, kw)
    return kw


def _draw_clip(r: random.Random, kw: dict) -> None:
    """At most one clip argument, into ``kw``."""
    c = r.random()
    if c < 0.15:
        kw["clipnorm"] = r.choice([0.1, 1.0])
    elif c < 0.3:
        kw["clipvalue"] = r.choice([0.1, 0.5])
    elif c < 0.45:
        kw["global_clipnorm"] = r.choice([0.2, 1.0])


def _learning_rate(r: random.Random, cls: str, schedules) -> dict | None:
    kind = r.choice(["number", "number", "schedule", "callable"])
    if kind == "schedule" and cls != "Nadam":  # legacy Nadam refuses schedules
        name, config = r.choice(schedules)
        return {"kind": "schedule", "class_name": name, "config": dict(config)}
    if kind == "callable":
        return {"kind": "callable", "value": CALLABLE_RATE}
    return None


def _steps(r, rng, n_steps, sparse, minimize, bad_steps=False, first_full=False):
    steps = []
    for t in range(n_steps):
        if (first_full and t == 0) or r.random() >= 0.3:
            which = [0, 1, 2]
        else:
            which = sorted(r.sample(range(3), r.choice([1, 2])))
        bad = bad_steps and t > 0 and r.random() < 0.3
        grads = []
        for i in which:
            shape = SHAPES[i][1]
            if sparse and i == SPARSE_INDEX:
                n = r.choice([2, 3, 4])
                indices = [r.randrange(SPARSE_ROWS) for _ in range(n)]
                indices[1] = indices[0]  # a duplicate in every step
                values = (rng.standard_normal((n, shape[1])) * 0.5).astype(np.float32)
                if bad and r.random() < 0.5:
                    values[1, 1] = r.choice([np.inf, -np.inf, np.nan])
                grads.append({"indices": indices, "values": values})
            else:
                g = (rng.standard_normal(shape) * 0.5).astype(np.float32)
                if bad and r.random() < 0.5:
                    g.flat[0] = r.choice([np.inf, -np.inf, np.nan])
                grads.append(g)
        steps.append({"variables": which, "gradients": grads, "minimize": minimize})
    return steps


def legacy_combos(n: int) -> list[dict]:
    cases = []
    for k in range(n):
        r = random.Random(7000 + k)
        cls = r.choice(LEGACY_CLASSES)
        kwargs = _legacy_kwargs(r, cls)
        rate = _learning_rate(r, cls, LEGACY_SCHEDULES)
        minimize = r.random() < 0.25
        sparse = not minimize and r.random() < 0.5
        changes = {}
        if r.random() < 0.3:
            changes[r.randrange(1, LEGACY_STEPS)] = {"learning_rate": 0.02}
        if r.random() < 0.2 and cls in ("Adam", "Nadam", "Adamax"):
            changes.setdefault(r.randrange(1, LEGACY_STEPS), {})["beta_1"] = 0.6
        if r.random() < 0.2 and "momentum" in kwargs:
            changes.setdefault(r.randrange(1, LEGACY_STEPS), {})["momentum"] = 0.3
        cases.append(
            _legacy_case(f"combo_legacy_{k:02d}", cls, kwargs, rate, sparse, changes, minimize)
        )
    return cases


def _legacy_case(case_id, cls, kwargs, rate, sparse, changes, minimize, **extra) -> dict:
    return {
        "id": case_id,
        "source": "tf_keras_legacy",
        "class_name": cls,
        "kwargs": kwargs,
        "learning_rate": rate,
        "sparse": sparse,
        "changes": changes,
        "minimize": minimize,
        **extra,
    }


def lso_combos(n: int) -> list[dict]:
    cases = []
    for k in range(n):
        r = random.Random(8000 + k)
        cls = r.choice(LEGACY_CLASSES)
        kwargs = _legacy_kwargs(r, cls)
        loss_scale = {"dynamic": True, "dynamic_growth_steps": r.choice([1, 2, 3])}
        if r.random() < 0.6:
            loss_scale["initial_scale"] = r.choice([1.0, 2.0, 4.0, 1024.0])
        sparse = r.random() < 0.4
        case_id = f"combo_loss_scale_{k:02d}"
        cases.append(
            _legacy_case(case_id, cls, kwargs, None, sparse, {}, False, loss_scale=loss_scale)
        )
    return cases


def keras3_combos(n: int) -> list[dict]:
    cases = []
    for k in range(n):
        r = random.Random(9000 + k)
        cls = r.choice(["AdamW", "Lion", "Lamb", "Adafactor"])
        kw: dict = {"learning_rate": r.choice([0.01, 0.1, 0.5])}
        if cls == "AdamW":
            if r.random() < 0.4:
                kw["amsgrad"] = True
            if r.random() < 0.3:
                kw["beta_1"] = 0.8
        if cls == "Lion" and r.random() < 0.4:
            kw["beta_1"] = 0.5
        if cls == "Adafactor":
            if r.random() < 0.3:
                kw["beta_2_decay"] = -0.5
            if r.random() < 0.3:
                kw["clip_threshold"] = 0.5
            if r.random() < 0.3:
                kw["epsilon_2"] = 1e-2
            if r.random() < 0.3:
                kw["relative_step"] = False
        if r.random() < 0.6:
            kw["weight_decay"] = r.choice([0.0, 0.01, 0.1])
        if r.random() < 0.4:
            kw["use_ema"] = True
            kw["ema_momentum"] = r.choice([0.9, 0.5])
            if r.random() < 0.5:
                kw["ema_overwrite_frequency"] = r.choice([2, 3])
        if r.random() < 0.35:
            kw["gradient_accumulation_steps"] = r.choice([2, 3])
        _draw_clip(r, kw)
        if r.random() < 0.2:
            kw["loss_scale_factor"] = r.choice([2.0, 128.0])
        rate = None
        if r.random() < 0.3:
            name, config = r.choice(KERAS3_SCHEDULES)
            rate = {"kind": "schedule", "class_name": name, "config": dict(config)}
        exclude = ["bias"] if kw.get("weight_decay") and r.random() < 0.3 else None
        cases.append(
            {
                "id": f"combo_keras3_{k:02d}",
                "source": "keras3",
                "class_name": cls,
                "kwargs": kw,
                "learning_rate": rate,
                "exclude_from_weight_decay": exclude,
            }
        )
    return cases


def _legacy_rate(spec):
    if spec is None:
        return None
    if spec["kind"] == "callable":
        return lambda: spec["value"]
    return getattr(tf_keras.optimizers.schedules, spec["class_name"])(**spec["config"])


def _tf_gradient(g, shape):
    if isinstance(g, dict):
        return tf.IndexedSlices(
            tf.constant(g["values"]), tf.constant(g["indices"], tf.int64), tf.constant(shape)
        )
    return tf.constant(g)


def _scaled(g, scale):
    if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(g.values * scale, g.indices, g.dense_shape)
    return g * scale


def _all_finite(grads) -> bool:
    return all(np.all(np.isfinite(g["values"] if isinstance(g, dict) else g)) for g in grads)


def run_legacy_combo(case: dict) -> dict:
    """Runs a legacy (or loss-scaled legacy) combination case through tf.keras, eagerly."""
    r = random.Random(case["id"])
    rng = case_rng(case["id"])
    lso = case.get("loss_scale")
    initial = [rng.standard_normal(shape).astype(np.float32) for _, shape in SHAPES]
    steps = _steps(
        r,
        rng,
        LSO_STEPS if lso else LEGACY_STEPS,
        case["sparse"],
        case["minimize"],
        bad_steps=bool(lso),
        first_full=bool(lso),
    )
    kwargs = dict(case["kwargs"])
    rate = _legacy_rate(case["learning_rate"])
    if rate is not None:
        kwargs["learning_rate"] = rate
    opt = getattr(LEGACY, case["class_name"])(**kwargs)
    if lso:
        opt = tf_keras.mixed_precision.LossScaleOptimizer(opt, **lso)
    tf_vars = [tf.Variable(x, name=name) for (name, _), x in zip(SHAPES, initial, strict=True)]
    changes = {int(t): attrs for t, attrs in case["changes"].items()}
    for t, step in enumerate(steps):
        for attr, value in changes.get(t, {}).items():
            setattr(opt, attr, value)
        which = step["variables"]
        if step["minimize"]:
            cs = [tf.constant(c) for c in step["gradients"]]

            def loss(cs=cs, which=which):
                return tf.add_n(
                    [
                        tf.reduce_sum(c * tf_vars[i] * tf_vars[i])
                        for c, i in zip(cs, which, strict=True)
                    ]
                )

            opt.minimize(loss, [tf_vars[i] for i in which])
        else:
            grads = [
                _tf_gradient(g, SHAPES[i][1]) for g, i in zip(step["gradients"], which, strict=True)
            ]
            if lso:  # as a training step has them: scaled by the loss, then unscaled
                grads = opt.get_unscaled_gradients([_scaled(g, opt.loss_scale) for g in grads])
            opt.apply_gradients(zip(grads, [tf_vars[i] for i in which], strict=True))
            if lso and not _all_finite(step["gradients"]):
                # kopt does not count a skipped step (docs/deviations.md); tf.keras adds one to
                # the inner optimizer's iterations. Take it back, so the cases test the rest.
                opt.inner_optimizer.iterations.assign_sub(1)
    expected = legacy_expected(opt, tf_vars)
    if lso:
        expected["loss_scale"] = float(opt.loss_scale.numpy())
        expected["dynamic_counter"] = int(opt.dynamic_counter.numpy())
        expected["config"] = json_safe(
            {k: v for k, v in opt.get_config().items() if k != "inner_optimizer"}
        )
    return {
        **case,
        "variables": [
            {"name": name, "shape": list(shape), "initial": to_json_array(x)}
            for (name, shape), x in zip(SHAPES, initial, strict=True)
        ],
        "steps": [_step_json(s) for s in steps],
        "expected": expected,
    }


def _step_json(step):
    grads = []
    for g in step["gradients"]:
        if isinstance(g, dict):
            grads.append({"indices": g["indices"], "values": _floats(g["values"])})
        else:
            grads.append(_floats(g))
    return {"variables": step["variables"], "gradients": grads, "minimize": step["minimize"]}


def _floats(x):
    """Nested lists of float32 values; the non-finite ones as the strings "inf", "-inf", "nan"
    (JSON has no literal for them)."""
    arr = np.asarray(x, np.float32)
    if arr.ndim == 0:
        v = float(arr)
        return v if np.isfinite(v) else str(v)
    return [_floats(a) for a in arr]


KERAS3_SLOT_MAP = {
    "AdamW": [("_momentums", "m"), ("_velocities", "v"), ("_velocity_hats", "vhat")],
    "Lion": [("_momentums", "m")],
    "Lamb": [("_momentums", "m"), ("_velocities", "v")],
    "Adafactor": [("_r", "r"), ("_c", "c"), ("_v", "v")],
}


def run_keras3_combo(case: dict) -> dict:
    rng = case_rng(case["id"])
    initial = [rng.standard_normal(shape).astype(np.float32) for _, shape in KERAS3_SHAPES]
    grads = [
        [(rng.standard_normal(shape) * 0.5).astype(np.float32) for _, shape in KERAS3_SHAPES]
        for _ in range(KERAS3_STEPS)
    ]
    keras.backend.clear_session()
    kwargs = dict(case["kwargs"])
    if case["learning_rate"] is not None:
        spec = case["learning_rate"]
        kwargs["learning_rate"] = getattr(keras.optimizers.schedules, spec["class_name"])(
            **spec["config"]
        )
    opt = getattr(keras.optimizers, case["class_name"])(**kwargs)
    if case["exclude_from_weight_decay"]:
        opt.exclude_from_weight_decay(var_names=case["exclude_from_weight_decay"])
    k_vars = [
        keras.Variable(x, dtype="float32", name=name)
        for (name, _), x in zip(KERAS3_SHAPES, initial, strict=True)
    ]
    for step in grads:
        opt.apply([keras.ops.convert_to_tensor(g) for g in step], k_vars)
    slots = []
    for i, var in enumerate(k_vars):
        entry = {}
        for attr, name in KERAS3_SLOT_MAP[case["class_name"]]:
            state = getattr(opt, attr, None)
            if state is None or state[i] is None:
                continue
            if name in ("r", "c") and len(var.shape) < 2:
                continue  # Adafactor's scalar placeholder
            entry[name] = to_json_array(np.asarray(state[i].value))
        if case["kwargs"].get("use_ema"):
            entry["average"] = to_json_array(
                np.asarray(opt._model_variables_moving_average[i].value)
            )
        slots.append(entry)
    expected = {
        "variables": [to_json_array(np.asarray(v.value)) for v in k_vars],
        "slots": slots,
        "calls": int(np.asarray(opt._iterations.value)),
        "config": json_safe(opt.get_config()),
    }
    return {
        **case,
        "variables": [
            {"name": name, "shape": list(shape), "initial": to_json_array(x)}
            for (name, shape), x in zip(KERAS3_SHAPES, initial, strict=True)
        ],
        "steps": [
            {"variables": [0, 1, 2], "gradients": [to_json_array(g) for g in step]}
            for step in grads
        ],
        "expected": expected,
    }

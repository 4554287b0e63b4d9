"""NumPy re-derivations of Keras's update rules, in float64, for the functional-core tests.

Written from Keras's documented update formulas (tf.keras legacy OptimizerV2), apart from kopt.
"""

import numpy as np


def adam(params, grads_seq, lr=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, round_to=None):
    """Keras's dense Adam (epsilon hat) over a sequence of gradients; returns the params.

    ``round_to`` (a NumPy-compatible dtype such as ``ml_dtypes.bfloat16``) rounds the params
    after every step, as a low-precision param would be. ``lr`` may be a function of the step
    count before the update (a warmup).
    """
    w = np.asarray(params, np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, g in enumerate(grads_seq, start=1):
        g = np.asarray(g, np.float64)
        alpha = (lr(t - 1) if callable(lr) else lr) * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        w = w - alpha * m / (np.sqrt(v) + epsilon)
        if round_to is not None:
            w = w.astype(round_to).astype(np.float64)
    return w


def sgd_momentum(params, grads_seq, lr, momentum, nesterov=False):
    """Keras's SGD with momentum: ``a = mu a - lr g``; ``w += a`` (Nesterov: ``mu a - lr g``)."""
    w = np.asarray(params, np.float64)
    a = np.zeros_like(w)
    for g in grads_seq:
        g = np.asarray(g, np.float64)
        a = momentum * a - lr * g
        w = w + (momentum * a - lr * g if nesterov else a)
    return w

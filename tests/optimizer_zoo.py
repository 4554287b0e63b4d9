"""Every kopt optimizer, configured so that all of its slots exist, for the parametrised tests."""

import kopt

# name -> factory(learning_rate, **kwargs); kwargs is slot_dtype where the optimizer takes one.
OPTIMIZERS = {
    "sgd": lambda lr, **kw: kopt.sgd(lr, momentum=0.9, nesterov=True, **kw),
    "adam": lambda lr, **kw: kopt.adam(lr, amsgrad=True, **kw),
    "adagrad": lambda lr, **kw: kopt.adagrad(lr, **kw),
    "adadelta": lambda lr, **kw: kopt.adadelta(lr, **kw),
    "adamax": lambda lr, **kw: kopt.adamax(lr, **kw),
    "nadam": lambda lr, **kw: kopt.nadam(lr, **kw),
    "rmsprop": lambda lr, **kw: kopt.rmsprop(lr, momentum=0.5, centered=True, **kw),
    "ftrl": lambda lr, **kw: kopt.ftrl(lr, l1_regularization_strength=0.01, **kw),
    "adamw": lambda lr, **kw: kopt.adamw(lr, **kw),
    "lion": lambda lr, **kw: kopt.lion(lr, **kw),
    "lamb": lambda lr, **kw: kopt.lamb(lr, **kw),
    "adafactor": lambda lr, **kw: kopt.adafactor(lr, **kw),
}

# The optimizers that accept `slot_dtype`.
WITH_SLOT_DTYPE = list(OPTIMIZERS)

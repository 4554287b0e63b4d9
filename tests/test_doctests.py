"""Every docstring example in kopt runs and shows its true output."""

import doctest
import importlib
import pkgutil
import tempfile

import pytest

import kopt

# The Keras facade's modules too: their examples show get_config values and weights, which
# went stale unnoticed while they were left out.
MODULES = ["kopt"] + sorted(
    info.name for info in pkgutil.walk_packages(kopt.__path__, prefix="kopt.")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    module = importlib.import_module(name)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
    # An example a user copies should not leave files behind (the checkpoint examples once did).
    assert not list(tmp_path.iterdir()), f"{name}'s examples left {list(tmp_path.iterdir())}"


FUNCTIONAL_CORE = ("kopt.base", "kopt.alias", "kopt.transforms", "kopt.sparse", "kopt.schedules")


def test_the_functional_core_public_names_have_examples():
    public = [getattr(kopt, n) for n in kopt.__all__]
    public += [getattr(kopt.schedules, n) for n in kopt.schedules.__all__]
    missing = [
        obj.__name__
        for obj in public
        if callable(obj)
        and getattr(obj, "__module__", "").startswith(FUNCTIONAL_CORE)
        and not obj.__name__.endswith("State")
        and ">>>" not in (obj.__doc__ or "")
    ]
    assert not missing, f"public names without a docstring example: {missing}"

"""Test configuration: 4 simulated CPU devices for the multi-device tests."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Many tests build a fresh optimizer and compile a program another test compiled already (the
# same update on the same shapes): JAX's persistent compilation cache, in a directory of this
# process's own that is removed at exit, skips XLA's part of the repeats (docs/performance.md
# recommends it to users for the same reason). A cache hit is still a compilation to the
# `backend_compiles` fixture (JAX records the event around the cache lookup too), and the
# cached executable is the one XLA compiled, so no test checks less. Set
# JAX_COMPILATION_CACHE_DIR to use a directory of your own.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _xla_cache = tempfile.mkdtemp(prefix="kopt-tests-xla-cache-")
    atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _xla_cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# "ci" (the default) keeps `make test` inside its time budget; HYPOTHESIS_PROFILE=long for a
# deeper local run.
settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class _Compile(str):
    """A compilation event (the event's name, as a string) with the compiled function's
    ``fun_name`` (``"jit(f)"``) as an attribute."""

    def __new__(cls, event: str, fun_name: str):
        out = super().__new__(cls, event)
        out.fun_name = fun_name
        return out


@pytest.fixture
def backend_compiles():
    """A list that gets an entry for every XLA compilation while the test runs (one served by
    the persistent compilation cache included). A step compiled again for inputs newly
    committed to a device is not traced again: only this count shows it."""
    events = []

    def listener(event, duration, **kwargs):
        if "backend_compile" in event:
            events.append(_Compile(event, kwargs.get("fun_name", "")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)

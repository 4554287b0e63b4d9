"""Test configuration: 4 simulated CPU devices for the multi-device tests."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

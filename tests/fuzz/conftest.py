"""Fuzz settings: a bounded profile for every test run, a long one on demand
(``HYPOTHESIS_PROFILE=fuzz-long``; see docs/hostile-input.md)."""
import os

from hypothesis import HealthCheck, settings

settings.register_profile("fuzz-ci", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz-long", max_examples=50_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: Examples per test: the profile's, scaled down for tests that talk to a real broker.
FUZZ_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "fuzz-ci")
LONG = FUZZ_PROFILE == "fuzz-long"


def examples(ci: int) -> int:
    """``ci`` examples in a normal run, a hundred times more in a long one."""
    return ci * 100 if LONG else ci

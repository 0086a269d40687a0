"""
The test suite.  Hypothesis runs with one profile for all of it: the same
examples every run (derandomized, no example database), no per-example
deadline and no "input generation is slow" health check, which measure the
machine, not the code; on a busy CI machine they failed tests whose
properties held.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "omerta",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("omerta")

"""Engine tests here run tiny models: one torch thread (the reason is in tests/infer/conftest.py)."""
from tests.infer.conftest import _one_thread  # noqa: F401  (an autouse fixture, registered by import)

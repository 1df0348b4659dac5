"""Test setup: 8 simulated CPU devices (a pod on a laptop) and deterministic PyTorch on the CPU.
(pytest puts the repository root on ``sys.path``; ``kernels/__init__.py`` itself hands the
top-level name ``kernels`` to Hugging Face's package, see ``tests/test_imports.py``.)"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_cpu_determinism():
    """Seeded, full-precision PyTorch when a test uses it (imported lazily: it is slow to load)."""
    import sys

    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        torch.manual_seed(0)
    yield


def pytest_configure(config):
    np.set_printoptions(precision=5, suppress=True)

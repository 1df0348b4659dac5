"""Test setup: 8 simulated CPU devices (a pod on a laptop), deterministic PyTorch on the CPU, and
Hugging Face's ``kernels`` package ahead of this repository's ``kernels/`` folder."""

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _import_hub_kernels() -> None:
    """pytest puts the repository root on ``sys.path``, where the top-level ``kernels/`` folder
    (installed as ``jdpt.kernels``) would shadow Hugging Face's ``kernels`` package, which
    transformers imports whenever that distribution is installed (transformers >= 5 requires it).
    Import the installed package with the root off the path, so ``sys.modules`` holds it."""
    root = Path(__file__).resolve().parents[1]
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if Path(p or ".").resolve() != root]
    try:
        if "kernels" not in sys.modules and importlib.util.find_spec("kernels") is not None:
            importlib.import_module("kernels")
    finally:
        sys.path[:] = saved


_import_hub_kernels()

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

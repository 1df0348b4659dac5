"""Helpers for comparing jdpt against the PyTorch reference implementations."""

from __future__ import annotations

import numpy as np


def torch_module():
    """Import torch for a parity test, on the CPU in fp32 with exact matmuls."""
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_grad_enabled(False)
    return torch


def to_numpy(x) -> np.ndarray:
    """A torch tensor (any dtype) or a JAX array as a float64-comparable numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def assert_parity(ours, ref, *, rtol: float = 1e-4, what: str = "output") -> float:
    """Max |ours - ref| <= rtol * max(1, max|ref|) (the project's parity tolerance).

    Returns the measured error relative to that scale, for reporting.
    """
    ours, ref = to_numpy(ours), to_numpy(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    assert np.all(np.isfinite(ours)), f"{what}: non-finite values"
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= rtol * scale, f"{what}: max|diff| {err:.3e} > {rtol} * {scale:.3e}"
    return err / scale

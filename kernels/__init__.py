"""Pallas kernels, installed as ``jdpt.kernels`` (the top-level name ``kernels`` belongs to
Hugging Face's kernel hub on PyPI). Each kernel module keeps a plain-JAX reference beside it.

- :mod:`jdpt.kernels.attention`: perturbed (SoftPAG / PAG, joint-MMDiT PAG) flash attention;
  importing it registers the ``"pallas"`` implementation of :func:`jdpt.models.attention.attention`
  (``AttentionPlan(impl="pallas")``).
- :mod:`jdpt.kernels.guidance`: the guidance combine (CFG / CFG-Zero* / PAG / SEG) in two passes;
  opt-in from the guidance objects (``combine_impl="pallas"``).
"""

from jdpt.kernels import attention, guidance

__all__ = ["attention", "guidance"]

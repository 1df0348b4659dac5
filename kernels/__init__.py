"""Pallas kernels, installed as ``jdpt.kernels`` (the top-level name ``kernels`` belongs to
Hugging Face's kernel hub on PyPI). Each kernel module keeps a plain-JAX reference beside it.

- :mod:`jdpt.kernels.attention`: perturbed (SoftPAG / PAG, joint-MMDiT PAG) flash attention;
  importing it registers the ``"pallas"`` implementation of :func:`jdpt.models.attention.attention`
  (``AttentionPlan(impl="pallas")``; a plan naming it imports it on first use).
- :mod:`jdpt.kernels.guidance`: the guidance combine (CFG / CFG-Zero* / PAG / SEG) in two passes;
  opt-in from the guidance objects (``combine_impl="pallas"``).

When Python runs from the repository root, this folder is also found as a top-level ``kernels``
package ahead of Hugging Face's (transformers and diffusers import that one). Imported under that
name, this file hands the name over: it loads the installed ``kernels`` distribution in its place,
or raises ``ModuleNotFoundError`` as a missing package would.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(
            "No module named 'kernels' (the repository's kernels/ folder is jdpt.kernels, not "
            "Hugging Face's kernels package)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import system returns what sys.modules holds
    _spec.loader.exec_module(_module)
else:
    from jdpt.kernels import attention, guidance

    __all__ = ["attention", "guidance"]

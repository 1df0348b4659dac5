"""Pallas kernels, installed as ``jdpt.kernels`` (the top-level name ``kernels`` belongs to
Hugging Face's kernel hub on PyPI). Each kernel module keeps a plain-JAX reference beside it."""

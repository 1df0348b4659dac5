"""The package list in pyproject.toml ships every package, with kernels/ as jdpt.kernels."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    dirs = {v: k for k, v in setup["package-dir"].items()}
    on_disk = set()
    for top in ("jdpt", "kernels"):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT)
            name = dirs.get(rel.parts[0], rel.parts[0])
            on_disk.add(".".join((name, *rel.parts[1:])))
    assert listed == on_disk
    assert setup["package-dir"]["jdpt.kernels"] == "kernels" and "kernels" not in listed


def test_kernels_import_as_jdpt_kernels():
    import jdpt.kernels

    assert Path(jdpt.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"


def test_hub_kernels_package_is_not_shadowed():
    """Where Hugging Face's ``kernels`` distribution is installed (transformers >= 5 requires it),
    ``import kernels`` is that package, not this repository's folder (tests/conftest.py), and
    transformers' hub-kernel integration imports."""
    import importlib.metadata

    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return  # nothing to shadow
    import kernels

    assert ROOT / "kernels" not in Path(kernels.__file__).resolve().parents
    import transformers.integrations.hub_kernels  # noqa: F401  (raised ImportError when shadowed)

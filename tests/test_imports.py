"""Import hygiene: the library never imports its Shapes world, its packages import each other
without cycles, ``import jdpt`` loads no kernel, and the repository's ``kernels/`` folder never
shadows Hugging Face's ``kernels`` package when Python runs from the repository root."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The library proper: none of it may import jdpt.world (DESIGN principle 7).
CORE = ("jdpt.models", "jdpt.diffusion", "jdpt.objectives", "jdpt.guidance", "jdpt.parallel", "jdpt.train",
        "jdpt.weights", "jdpt.data", "jdpt.rewards", "jdpt.kernels")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":
        parts = ["jdpt", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _package(module: str) -> str:
    """``jdpt.objectives.nft`` -> ``jdpt.objectives``; top-level modules (``jdpt.cli``) are their own."""
    return ".".join(module.split(".")[:2])


def _nodes(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (annotations, never run)."""
    for node in ast.iter_child_nodes(tree):
        test = getattr(node, "test", None) if isinstance(node, ast.If) else None
        if test is not None and "TYPE_CHECKING" in ast.unparse(test):
            continue
        yield node
        yield from _nodes(node)


def _imports(path: Path) -> set[str]:
    """Every jdpt module or name ``path`` imports, at module level or inside a function:
    ``from jdpt.a import b`` gives ``jdpt.a`` and ``jdpt.a.b`` (b may be a module)."""
    out = set()
    for node in _nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "jdpt"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "jdpt":
                out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return out


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in [*(ROOT / "jdpt").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]}


def package_graph() -> dict[str, set[str]]:
    """Package -> the other jdpt packages its modules import."""
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in _sources().items():
        source = _package(module)
        graph[source] |= {_package(t) for t in _imports(path) if t != "jdpt" or source == "jdpt"} - {source}
    return graph


def module_graph() -> dict[str, set[str]]:
    """Module -> the jdpt modules it imports (a package's ``__init__`` is the package's name)."""
    sources = _sources()
    return {module: {t for t in _imports(path) if t in sources} - {module} for module, path in sources.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that returns to its start, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_core_packages_never_import_the_world():
    graph = package_graph()
    offenders = {p: sorted(graph[p]) for p in CORE if "jdpt.world" in graph[p]}
    assert not offenders, f"library packages importing jdpt.world: {offenders}"
    for package in CORE:
        assert package in graph, f"{package} was not scanned"


def test_package_imports_have_no_cycle():
    graph = package_graph()
    assert find_cycle(graph) is None, f"import cycle between packages: {' -> '.join(find_cycle(graph))}"


def test_module_imports_have_no_cycle():
    """No module imports, directly or through others, a module that imports it back (lazy imports
    inside functions included; ``if TYPE_CHECKING:`` imports, which never run, excluded)."""
    graph = module_graph()
    assert len(graph) > 80 and "jdpt.world.alignment" in graph["jdpt.world"]
    assert find_cycle(graph) is None, f"import cycle between modules: {' -> '.join(find_cycle(graph))}"


ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
ENV.pop("PYTHONPATH", None)


def _python(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=ENV)


def test_importing_the_library_loads_no_world_and_no_kernel():
    """In a fresh interpreter: ``import jdpt`` loads no kernel and no world; each core package
    imported leaves jdpt.world unloaded (catches imports the scan cannot see, e.g. through
    importlib); a plan naming ``impl="pallas"`` imports its kernel module on first use."""
    packages = [p for p in CORE if p != "jdpt.kernels"]
    code = "\n".join([
        "import importlib, sys",
        "import jdpt",
        "assert not [m for m in sys.modules if m.startswith(('jdpt.kernels', 'jdpt.world'))], sorted(sys.modules)",
        f"for name in {packages!r}:",
        "    importlib.import_module(name)",
        "loaded = sorted(m for m in sys.modules if m.startswith(('jdpt.world', 'jdpt.kernels')))",
        "assert not loaded, loaded",
        "import jax.numpy as jnp",
        "from jdpt.models.attention import AttentionPlan, attention",
        "q = jnp.ones((1, 8, 2, 8))",
        "out, _ = attention(q, q, q, plan=AttentionPlan(impl='pallas'))",
        "assert 'jdpt.kernels.attention' in sys.modules and out.shape == q.shape",
        "print('ok')",
    ])
    result = _python(code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_repository_root_does_not_shadow_hub_kernels():
    """From the repository root (sys.path[0] = '' for -c, the root for -m), ``kernels`` is Hugging
    Face's package, which transformers imports; jdpt.kernels is still this repository's folder."""
    result = _python("from transformers import CLIPTextModel; import jdpt, jdpt.kernels, kernels; "
                     "print(kernels.__file__); print(jdpt.kernels.__file__)")
    assert result.returncode == 0, result.stderr[-3000:]
    hub, ours = result.stdout.split()
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"
    if importlib.util.find_spec("kernels") is not None:  # pytest's own path puts the root first too
        assert Path(hub).resolve().parent != ROOT / "kernels"
    module = subprocess.run([sys.executable, "-m", "jdpt.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=ENV)
    assert module.returncode == 0, module.stderr[-3000:]


def test_top_level_kernels_without_the_hub_package_is_missing(tmp_path):
    """With Hugging Face's package absent, ``import kernels`` from the root fails as a missing
    package does (ModuleNotFoundError naming 'kernels'), never as this repository's folder."""
    code = "\n".join([
        "import importlib.machinery, sys",
        "real = importlib.machinery.PathFinder.find_spec",
        "def hide(name, path=None, target=None):",
        "    spec = real(name, path, target)",
        f"    return None if name == 'kernels' and spec and '{ROOT / 'kernels'}' not in str(spec.origin) else spec",
        "importlib.machinery.PathFinder.find_spec = hide",
        "try:",
        "    import kernels",
        "except ModuleNotFoundError as error:",
        "    assert error.name == 'kernels' and 'kernels' not in sys.modules, error",
        "    print('missing')",
    ])
    result = _python(code)
    assert result.returncode == 0 and result.stdout.strip() == "missing", (result.stdout, result.stderr[-3000:])

"""Device meshes and the logical-axis rules that place parameters on them."""

from jdpt.parallel.mesh import DEFAULT_RULES, param_shardings

__all__ = ["DEFAULT_RULES", "param_shardings"]

"""Inference-time guidance: each method a plan for the attention entry point plus a rule that
combines the model's predictions (CFG, CFG-Zero*, PAG, SoftPAG/HeadHunter, SEG, StyleAligned,
Attend-and-Excite). A :class:`Guidance` object drives the denoising step of ``flux_generate``,
``sd_generate`` and ``sd3_generate`` (``guidance=``).

The pipelines import this package, so its StyleAligned and Attend-and-Excite names (which run the
pipelines and the Shapes world themselves) load on first use.
"""

import importlib

from jdpt.guidance.cfg import CFG, CFGZeroStar, Guidance, cfg, cfg_zero_star, cfg_zero_star_scale
from jdpt.guidance.head_search import HeadSearchConfig, head_hunter
from jdpt.guidance.perturbation import (
    PAG, SEG, SoftPAG, adaptive_scale, attention_layers, pag, pag_plans, seg, seg_plans,
)

_LAZY = {
    "AttendExciteConfig": "attend_excite", "attend_excite_ddim": "attend_excite",
    "attend_excite_euler": "attend_excite", "attend_excite_loss": "attend_excite",
    "StyleAligned": "style_aligned", "StyleAlignedConfig": "style_aligned", "ddim_invert": "style_aligned",
    "euler_invert": "style_aligned", "style_aligned_plans": "style_aligned",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"jdpt.guidance.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'jdpt.guidance' has no attribute {name!r}")


__all__ = [
    "CFG", "PAG", "SEG", "CFGZeroStar", "Guidance", "HeadSearchConfig", "SoftPAG", "adaptive_scale",
    "attention_layers", "cfg", "cfg_zero_star", "cfg_zero_star_scale", "head_hunter", "pag", "pag_plans",
    "seg", "seg_plans", *_LAZY,
]

"""Inference-time guidance: each method a plan for the attention entry point plus a rule that
combines the model's predictions (CFG, CFG-Zero*, PAG, SoftPAG/HeadHunter, SEG, StyleAligned,
Attend-and-Excite). A :class:`~jdpt.diffusion.branches.Guidance` object drives the denoising step
of ``flux_generate``, ``sd_generate`` and ``sd3_generate`` (``guidance=``).
"""

from jdpt.diffusion.branches import Guidance
from jdpt.guidance.attend_excite import AttendExciteConfig, attend_excite_ddim, attend_excite_euler, attend_excite_loss
from jdpt.guidance.cfg import CFG, CFGZeroStar, cfg, cfg_zero_star, cfg_zero_star_scale
from jdpt.guidance.head_search import HeadSearchConfig, head_hunter
from jdpt.guidance.perturbation import (
    PAG,
    SEG,
    SoftPAG,
    adaptive_scale,
    attention_layers,
    pag,
    pag_plans,
    seg,
    seg_plans,
)
from jdpt.guidance.style_aligned import StyleAligned, StyleAlignedConfig, ddim_invert, euler_invert, style_aligned_plans

__all__ = [
    "CFG", "PAG", "SEG", "AttendExciteConfig", "CFGZeroStar", "Guidance", "HeadSearchConfig", "SoftPAG",
    "StyleAligned", "StyleAlignedConfig", "adaptive_scale", "attend_excite_ddim", "attend_excite_euler",
    "attend_excite_loss", "attention_layers", "cfg", "cfg_zero_star", "cfg_zero_star_scale", "ddim_invert",
    "euler_invert", "head_hunter", "pag", "pag_plans", "seg", "seg_plans", "style_aligned_plans",
]

"""Post-training objectives: each a frozen hyper-parameter dataclass (the paper's defaults) with
``loss(params, frozen, batch, key) -> (scalar, metrics)`` for :func:`jdpt.parallel.make_train_step`.

Offline (a fixed dataset): :class:`SFT`, :class:`DPO` (Diffusion-DPO), :class:`MaPO`.
Online (rollout -> reward -> update): :class:`DDPO`, :class:`DPOK`, :class:`FlowGRPO`,
:class:`NFT` (DiffusionNFT), and reward backprop :class:`DRaFT`, :class:`AlignProp`, :class:`ReFL`;
DPOK's value baseline :class:`ValueNet` (trained by :class:`ValueRegression`) and Flow-GRPO's
weight EMA :func:`ema_update`.
Models are seen through a :data:`~jdpt.objectives.denoiser.Denoiser`; the reference policy is the
LoRA base or a frozen copy (:func:`~jdpt.objectives.denoiser.reference_model`).
"""

from jdpt.objectives.advantages import PerPromptStatTracker, group_advantages, sharded_group_advantages
from jdpt.objectives.ddpo import DDPO, DPOK, clipped_surrogate
from jdpt.objectives.denoiser import Denoiser, reference_model
from jdpt.objectives.dpo import DPO, dpo_loss
from jdpt.objectives.grpo import FlowGRPO, ema_update
from jdpt.objectives.mapo import MaPO, mapo_loss
from jdpt.objectives.nft import NFT, nft_loss, update_old
from jdpt.objectives.reward_backprop import AlignProp, DRaFT, ReFL
from jdpt.objectives.sft import SFT, ForwardProcess
from jdpt.objectives.value import ValueNet, ValueRegression, value_advantages, value_batch, value_loss

__all__ = [
    "DDPO", "DPO", "DPOK", "NFT", "SFT", "AlignProp", "DRaFT", "Denoiser", "FlowGRPO", "ForwardProcess",
    "MaPO", "PerPromptStatTracker", "ReFL", "ValueNet", "ValueRegression", "clipped_surrogate", "dpo_loss",
    "ema_update", "group_advantages", "mapo_loss", "nft_loss", "reference_model", "sharded_group_advantages",
    "update_old", "value_advantages", "value_batch", "value_loss",
]

"""PAG and CFG-Zero* denoising predictions for one step on a tiny random SD UNet vs diffusers.

diffusers side: ``UNet2DConditionModel`` with ``PAGCFGIdentitySelfAttnProcessor2_0`` (batch
``[uncond, cond, cond]``) or ``PAGIdentitySelfAttnProcessor2_0`` (batch ``[cond, cond]``) on
the mid block's self-attention (``pag_applied_layers=["mid"]``), combined with the PAG
pipelines' formula (``PAGMixin._apply_perturbed_attention_guidance`` with its adaptive scale);
CFG-Zero* is diffusers' ``ClassifierFreeZeroStarGuidance`` guider applied to the torch UNet's
``[uncond, cond]`` predictions. jdpt side: the ``PAG`` / ``CFGZeroStar`` guidance objects, one
forward over the branch batch. Tolerance: the project's parity bound, max|diff| <= 1e-4 *
max(1, max|ref|), fp32 on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdpt
from jdpt.guidance.cfg import CFGZeroStar
from jdpt.guidance.perturbation import PAG
from tests.reference import assert_parity, torch_module

UNET = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2)
B, H, W, L = 2, 8, 8, 3
TIMESTEP = 801.0
W_CFG, S_PAG, S_AD = 7.5, 3.0, 0.005
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch = torch_module()
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(0)
    ref = TorchUNet(**UNET).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("guidance_unet")
    ref.save_pretrained(folder)
    model = jdpt.from_diffusers(folder)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, H, W, 4)).astype(np.float32)
    pos = rng.normal(size=(B, L, 8)).astype(np.float32)
    neg = rng.normal(size=(B, L, 8)).astype(np.float32)
    guidance = PAG(scale=S_PAG, cfg_scale=W_CFG, adaptive_scale=S_AD)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def forward(model, guidance):
        """One forward over [uncond, cond, perturbed], as the pipelines run PAG with CFG."""
        plans = guidance.plans(model, B, (H, W))
        return model(jnp.concatenate([x] * 3), jnp.float32(TIMESTEP), jnp.concatenate([neg, pos, pos]),
                     plans=plans)

    stacked = np.asarray(forward(model, guidance))
    return dict(ref=ref, x=x, pos=pos, neg=neg, stacked=stacked, guidance=guidance)


def _torch_predictions(setup, processor, contexts):
    """The torch UNet's predictions over a batch of len(contexts) copies of x (NHWC out)."""
    import copy

    import torch

    ref = copy.deepcopy(setup["ref"])
    if processor is not None:
        for attention in ref.mid_block.attentions:
            for block in attention.transformer_blocks:
                block.attn1.set_processor(processor)
    x = torch.from_numpy(np.ascontiguousarray(setup["x"].transpose(0, 3, 1, 2)))
    out = ref(torch.cat([x] * len(contexts)), torch.tensor(TIMESTEP),
              torch.from_numpy(np.concatenate(contexts))).sample
    return out.permute(0, 2, 3, 1).contiguous()


def _pag_scale(t):
    return max(0.0, S_PAG - S_AD * (1000 - t))  # PAGMixin._get_pag_scale


def test_pag_with_cfg_matches_diffusers(setup):
    from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

    pred = _torch_predictions(setup, PAGCFGIdentitySelfAttnProcessor2_0(), [setup["neg"], setup["pos"], setup["pos"]])
    uncond, text, perturb = pred.chunk(3)
    ref = uncond + W_CFG * (text - uncond) + _pag_scale(TIMESTEP) * (text - perturb)
    ours = setup["guidance"].combine(setup["stacked"], step=jnp.int32(0), timestep=jnp.float32(TIMESTEP))
    assert_parity(setup["stacked"], pred, what="PAG+CFG branch predictions")
    assert_parity(ours, ref, what="PAG+CFG guided prediction")
    assert np.abs(setup["stacked"][2 * B:] - setup["stacked"][B:2 * B]).max() > 1e-3  # perturbation matters


def test_pag_without_cfg_matches_diffusers(setup):
    """PAGIdentitySelfAttnProcessor2_0 over [cond, cond]; ours: the cond and perturbed chunks of
    the same forward (row-wise identical to a [cond, perturbed] batch) combined without CFG."""
    from diffusers.models.attention_processor import PAGIdentitySelfAttnProcessor2_0

    pred = _torch_predictions(setup, PAGIdentitySelfAttnProcessor2_0(), [setup["pos"], setup["pos"]])
    text, perturb = pred.chunk(2)
    ref = text + _pag_scale(TIMESTEP) * (text - perturb)
    no_cfg = PAG(scale=S_PAG, adaptive_scale=S_AD, use_cfg=False)
    ours = no_cfg.combine(setup["stacked"][B:], step=jnp.int32(0), timestep=jnp.float32(TIMESTEP))
    assert_parity(ours, ref, what="PAG (no CFG) guided prediction")


@pytest.mark.parametrize("step", [0, 1, 3])
def test_cfg_zero_star_matches_diffusers_guider(setup, step):
    """ClassifierFreeZeroStarGuidance(zero_init_steps=2) at steps 0, 1 (zeroed) and 3."""
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    pred = _torch_predictions(setup, None, [setup["neg"], setup["pos"]])
    uncond, cond = pred.chunk(2)
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=W_CFG, zero_init_steps=2)
    guider.set_state(step=step, num_inference_steps=10, timestep=TIMESTEP)
    ref = guider.forward(pred_cond=cond, pred_uncond=uncond).pred
    ours = CFGZeroStar(scale=W_CFG, zero_steps=2).combine(setup["stacked"][:2 * B], step=jnp.int32(step),
                                                        timestep=jnp.float32(TIMESTEP))
    assert_parity(setup["stacked"][:2 * B], pred, what="[uncond, cond] predictions")
    assert_parity(ours, ref, what=f"CFG-Zero* at step {step}")
    assert (np.abs(np.asarray(ours)).max() == 0) == (step < 2)

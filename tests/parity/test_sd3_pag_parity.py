"""PAG and CFG-Zero* denoising predictions for one step on a tiny random SD3 vs diffusers.

diffusers has two SD3 PAG definitions, and jdpt reproduces each with a different plan:

- ``StableDiffusion3PAGPipeline`` (``PAGCFGJointAttnProcessor2_0`` over ``[uncond, cond,
  perturbed]``, ``PAGJointAttnProcessor2_0`` over ``[cond, perturbed]`` without CFG): in the
  perturbed rows the image-image block of the joint ``[image, text]`` attention is masked to its
  diagonal, so an image query sees its own key and every text key; text queries are unchanged.
  jdpt: ``PAG`` (``AttentionPlan.joint_identity``), run here through the whole pipeline for one
  Euler step, with impl ``"xla"`` and ``"pallas"`` (the kernel takes the mode natively).
- the ``PerturbedAttentionGuidance`` guider (modular pipelines): its layer-skip hook makes
  ``scaled_dot_product_attention`` return ``value``, so *every* token of the joint sequence, text
  included, outputs its own value. jdpt: ``SoftPAG`` with ``u = 1`` on the layer's heads. (In
  diffusers 0.42 the hook itself refuses SD3's processor; the test runs the same mode directly.)

CFG-Zero* is diffusers' ``ClassifierFreeZeroStarGuidance`` guider (no SD3 pipeline flag exists in
diffusers 0.42) applied to the torch transformer's ``[uncond, cond]`` predictions.

Tolerance: the project's parity bound, max|diff| <= 1e-4 * max(1, max|ref|), fp32 on CPU.
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdpt
import jdpt.kernels.attention  # noqa: F401  (registers impl="pallas")
from jdpt.guidance.cfg import CFGZeroStar
from jdpt.guidance.perturbation import PAG, SoftPAG, diffusers_pag_layers
from jdpt.models.sd3 import SD3Config, SD3Transformer
from tests.reference import assert_parity, torch_module

# SD3-like (no qk norm, no dual attention); 8x8 latents = 4x4 patches, 5 text tokens. Block 1 is
# diffusers' default PAG layer; block 2 is the last (context_pre_only) block.
SD3 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
           num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
           pooled_projection_dim=10, out_channels=4, pos_embed_max_size=6)
B, H, W, L = 2, 8, 8, 5
SIGMA = 0.7  # one Euler step from sigma 0.7 to 0: timestep 700
W_CFG, S_PAG, S_AD = 5.0, 3.0, 0.002
FAST_COMPILE = {"xla_backend_optimization_level": 0}
LAYER = "transformer_blocks.1.attn"


def _torch_sd3(cfg: dict):
    torch = torch_module()
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**cfg).eval()
    with torch.no_grad():  # random everything, so a zero bias or unit norm cannot hide a mapping bug
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ref = _torch_sd3(SD3)
    folder = tmp_path_factory.mktemp("sd3_pag")
    ref.save_pretrained(folder)
    rng = np.random.default_rng(0)
    data = dict(
        x=rng.normal(size=(B, H, W, SD3["in_channels"])),  # NHWC latents
        pos=rng.normal(size=(B, L, SD3["joint_attention_dim"])),
        neg=rng.normal(size=(B, L, SD3["joint_attention_dim"])),
        pooled=rng.normal(size=(B, SD3["pooled_projection_dim"])),
        neg_pooled=rng.normal(size=(B, SD3["pooled_projection_dim"])),
    )
    data = {k: v.astype(np.float32) for k, v in data.items()}
    return dict(ref=ref, model=jdpt.from_diffusers(folder), **data)


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def _forward(model, x, context, pooled, guidance):
    """One forward over the guidance's branch batch (``[uncond, cond, perturbed]`` or a subset)."""
    n = len(guidance.branches)
    plans = guidance.plans(model, x.shape[0], x.shape[1:3])
    return model(jnp.concatenate([x] * n), context, pooled, jnp.float32(1000 * SIGMA), plans=plans)


def _branch_inputs(setup, branches):
    pick = {"uncond": ("neg", "neg_pooled"), "cond": ("pos", "pooled"), "perturbed": ("pos", "pooled")}
    context = np.concatenate([setup[pick[b][0]] for b in branches])
    pooled = np.concatenate([setup[pick[b][1]] for b in branches])
    return context, pooled


def _jdpt_step(setup, guidance):
    """jdpt's branch predictions ``[n B, H, W, C]`` and guided prediction ``[B, H, W, C]``."""
    context, pooled = _branch_inputs(setup, guidance.branches)
    stacked = _forward(setup["model"], setup["x"], context, pooled, guidance)
    guided = guidance.combine(stacked, step=jnp.int32(0), timestep=jnp.float32(1000 * SIGMA))
    return np.asarray(stacked), np.asarray(guided)


def _nchw(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def _diffusers_pipeline_step(setup, guidance_scale: float, layers=("blocks.1",)):
    """One denoising step of ``StableDiffusion3PAGPipeline`` around the tiny transformer (no text
    encoders or VAE: embeddings in, latents out). Returns the transformer's raw batch output
    ``[n B, H, W, C]``, the guided prediction handed to the scheduler, and the stepped latents."""
    torch = torch_module()
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3PAGPipeline

    ref = copy.deepcopy(setup["ref"])
    pipe = StableDiffusion3PAGPipeline(
        transformer=ref, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
        pag_applied_layers=list(layers),
    )
    pipe.set_progress_bar_config(disable=True)
    seen = {}

    def record_output(module, args, out):  # returns None: the output is left as it is
        seen["raw"] = out[0].clone()

    ref.register_forward_hook(record_output)
    step = pipe.scheduler.step

    def record_step(model_output, *args, **kwargs):
        seen["guided"] = model_output.clone()
        return step(model_output, *args, **kwargs)

    pipe.scheduler.step = record_step
    t = lambda name: torch.from_numpy(setup[name])  # noqa: E731
    latents = pipe(
        prompt_embeds=t("pos"), negative_prompt_embeds=t("neg"), pooled_prompt_embeds=t("pooled"),
        negative_pooled_prompt_embeds=t("neg_pooled"), latents=_nchw(setup["x"]), height=8 * H, width=8 * W,
        sigmas=[SIGMA], guidance_scale=guidance_scale, pag_scale=S_PAG, pag_adaptive_scale=S_AD,
        output_type="latent", return_dict=False,
    )[0]
    return _nhwc(seen["raw"]), _nhwc(seen["guided"]), _nhwc(latents)


@pytest.fixture(scope="module")
def pipeline_with_cfg(setup):
    """diffusers' step with CFG: guidance 5, pag 3 (adaptive 0.002: 2.4 at t = 700), default layer "blocks.1"."""
    return _diffusers_pipeline_step(setup, W_CFG)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_pag_with_cfg_matches_diffusers_pipeline(setup, pipeline_with_cfg, impl):
    """One pipeline step with CFG; jdpt's default layers equal the pipeline's default "blocks.1"."""
    raw, guided_ref, latents_ref = pipeline_with_cfg
    guidance = PAG(scale=S_PAG, cfg_scale=W_CFG, adaptive_scale=S_AD, impl=impl)
    stacked, guided = _jdpt_step(setup, guidance)
    assert_parity(stacked, raw, what=f"[uncond, cond, perturbed] predictions ({impl})")
    assert_parity(guided, guided_ref, what=f"PAG+CFG guided prediction ({impl})")
    assert_parity(setup["x"] - SIGMA * guided, latents_ref, what=f"Euler step to sigma 0 ({impl})")
    assert np.abs(stacked[2 * B:] - stacked[B:2 * B]).max() > 1e-3  # the perturbation matters


def test_pag_without_cfg_matches_diffusers_pipeline(setup):
    """guidance_scale 1 turns CFG off: ``PAGJointAttnProcessor2_0`` over ``[cond, perturbed]``;
    PAG on the last (``context_pre_only``) block as well as block 1."""
    raw, guided_ref, _ = _diffusers_pipeline_step(setup, 1.0, layers=("blocks.1", "blocks.2"))
    guidance = PAG(scale=S_PAG, adaptive_scale=S_AD, use_cfg=False,
                   layers=diffusers_pag_layers(setup["model"], ["blocks.1", "blocks.2"]))
    stacked, guided = _jdpt_step(setup, guidance)
    assert_parity(stacked, raw, what="[cond, perturbed] predictions")
    assert_parity(guided, guided_ref, what="PAG (no CFG) guided prediction")


def test_pag_guider_semantics_is_full_identity_softpag(setup, pipeline_with_cfg):
    """diffusers' ``PerturbedAttentionGuidance`` guider perturbs by running the layer's processor
    under ``AttentionScoreSkipFunctionMode`` (``scaled_dot_product_attention`` returns ``value``).
    Its hook cannot be installed on SD3 in diffusers 0.42 (``JointAttnProcessor2_0`` is missing
    from its processor registry), so the perturbed forward here runs block 1's processor under
    that same mode, and the guider combines. This equals jdpt's SoftPAG with ``u = 1`` (every
    joint token, text included, keeps its own value) and differs from the pipelines' definition
    (image queries still see the text keys), which jdpt's PAG reproduces."""
    torch = torch_module()
    from diffusers.guiders import PerturbedAttentionGuidance
    from diffusers.hooks.layer_skip import AttentionScoreSkipFunctionMode
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    class ScoreSkip(JointAttnProcessor2_0):
        def __call__(self, *args, **kwargs):
            with AttentionScoreSkipFunctionMode():
                return super().__call__(*args, **kwargs)

    guider = PerturbedAttentionGuidance(guidance_scale=W_CFG, perturbed_guidance_scale=S_PAG,
                                        perturbed_guidance_layers=[1])
    guider.set_state(step=1, num_inference_steps=10, timestep=torch.tensor(1000 * SIGMA))  # inside [0.01, 0.2)
    assert guider.num_conditions == 3
    ref = copy.deepcopy(setup["ref"])
    t = lambda name: torch.from_numpy(setup[name])  # noqa: E731

    def predict(context, pooled):
        return ref(hidden_states=_nchw(setup["x"]), encoder_hidden_states=t(context), pooled_projections=t(pooled),
                   timestep=torch.full((B,), 1000 * SIGMA)).sample

    cond, uncond = predict("pos", "pooled"), predict("neg", "neg_pooled")
    ref.transformer_blocks[1].attn.set_processor(ScoreSkip())
    skip = predict("pos", "pooled")
    expected = guider.forward(pred_cond=cond, pred_uncond=uncond, pred_cond_skip=skip).pred

    heads = SD3["num_attention_heads"]
    soft = SoftPAG(head_weights={LAYER: jnp.ones(heads)}, scale=S_PAG, cfg_scale=W_CFG)
    stacked, guided = _jdpt_step(setup, soft)
    assert_parity(stacked, np.concatenate([_nhwc(uncond), _nhwc(cond), _nhwc(skip)]),
                  what="guider [uncond, cond, perturbed] predictions")
    assert_parity(guided, _nhwc(expected), what="PAG guider prediction")
    pipeline_perturbed = pipeline_with_cfg[0][2 * B:]
    assert np.abs(pipeline_perturbed - _nhwc(skip)).max() > 1e-3  # diffusers' two definitions differ


@pytest.fixture(scope="module")
def cfg_predictions(setup):
    """The torch and jdpt SD3 ``[uncond, cond]`` predictions (NHWC) at t = 700."""
    torch = torch_module()
    x = _nchw(setup["x"])
    t = lambda name: torch.from_numpy(setup[name])  # noqa: E731
    ref = setup["ref"](hidden_states=torch.cat([x, x]), encoder_hidden_states=torch.cat([t("neg"), t("pos")]),
                       pooled_projections=torch.cat([t("neg_pooled"), t("pooled")]),
                       timestep=torch.full((2 * B,), 1000 * SIGMA)).sample
    context, pooled = _branch_inputs(setup, CFGZeroStar().branches)
    ours = _forward(setup["model"], setup["x"], context, pooled, CFGZeroStar())
    return _nhwc(ref), np.asarray(ours)


@pytest.mark.parametrize("step", [0, 3])
def test_cfg_zero_star_on_sd3_matches_diffusers_guider(cfg_predictions, step):
    """``ClassifierFreeZeroStarGuidance(guidance_scale=5, zero_init_steps=1)`` on the torch SD3's
    ``[uncond, cond]`` predictions: step 0 is zeroed, step 3 uses the optimised scale."""
    torch = torch_module()
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    ref, stacked = cfg_predictions
    uncond, cond = np.split(ref, 2)
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=W_CFG, zero_init_steps=1)
    guider.set_state(step=step, num_inference_steps=10, timestep=torch.tensor(1000 * SIGMA))
    expected = guider.forward(pred_cond=torch.from_numpy(cond), pred_uncond=torch.from_numpy(uncond)).pred

    ours = CFGZeroStar(scale=W_CFG, zero_steps=1).combine(stacked, step=jnp.int32(step),
                                                          timestep=jnp.float32(1000 * SIGMA))
    assert_parity(stacked, ref, what="[uncond, cond] predictions")
    assert_parity(ours, expected, what=f"CFG-Zero* at step {step}")
    assert (np.abs(np.asarray(ours)).max() == 0) == (step == 0)


def test_diffusers_pag_layers_match_diffusers_selection():
    """diffusers picks self-attention modules by an unanchored ``re.search``: on a 12-block model
    ``"blocks.1"`` selects blocks 1, 10 and 11 (real SD3 checkpoints: 1 and 10-19), and on SD3.5
    dual-attention blocks also ``attn2``. ``diffusers_pag_layers`` reproduces the selection."""
    torch_module()
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3PAGPipeline
    from diffusers.models.attention_processor import JointAttnProcessor2_0, PAGCFGJointAttnProcessor2_0

    cfg = dict(SD3, num_layers=12, dual_attention_layers=(1, 2), qk_norm="rms_norm")
    ref = SD3Transformer2DModel(**cfg)
    model = nnx.eval_shape(lambda: SD3Transformer(SD3Config(**cfg), rngs=nnx.Rngs(0)))
    info = jdpt.guidance.attention_layers(model, (H, W))
    pipe = StableDiffusion3PAGPipeline(
        transformer=ref, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    cases = [["blocks.1"], ["blocks.1", "blocks.1[01]"], ["blocks.2"], "transformer_blocks.3", "blocks.(4|5)",
             ["blocks.1.attn$"]]
    for layers in cases:
        pipe.set_pag_applied_layers(layers, pag_attn_processors=(PAGCFGJointAttnProcessor2_0(), None))
        ref.set_attn_processor(JointAttnProcessor2_0())
        pipe._set_pag_attn_processor(pipe.pag_applied_layers, do_classifier_free_guidance=True)
        expected = sorted(name.removesuffix(".processor") for name, proc in ref.attn_processors.items()
                          if isinstance(proc, PAGCFGJointAttnProcessor2_0))
        chosen = jdpt.guidance.perturbation.select_layers(info, diffusers_pag_layers(model, layers))
        assert sorted(chosen) == expected, layers
        if layers == ["blocks.1"]:
            assert expected == [f"transformer_blocks.{i}.{a}" for i, a in
                                [(1, "attn"), (1, "attn2"), (10, "attn"), (11, "attn")]]
    assert len(expected) == 1  # "blocks.1.attn$": block 1's joint attention only


def test_diffusers_pag_layers_errors():
    model = nnx.eval_shape(lambda: SD3Transformer(SD3Config(**SD3), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"'blocks\.7' matches no self-attention layer"):
        diffusers_pag_layers(model, ["blocks.1", "blocks.7"])
    with pytest.raises(ValueError, match="at least one"):
        diffusers_pag_layers(model, [])
    with pytest.raises(ValueError, match="only for SD3Transformer; got Linear"):
        diffusers_pag_layers(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), "blocks.1")


def test_diffusers_pag_processor_drops_qk_norm():
    """Evidence for a known gap: diffusers' PAG joint processors never apply ``norm_q`` /
    ``norm_k`` / ``norm_added_*``, so on SD3.5 (``qk_norm="rms_norm"``) the pipeline's PAG layer
    changes even its unperturbed rows. jdpt keeps the model's qk norm in every branch, so SD3.5
    parity with ``StableDiffusion3PAGPipeline`` is not expected (this test fails once diffusers
    fixes it; then add an SD3.5 case above)."""
    torch = torch_module()
    from diffusers.models.attention_processor import PAGCFGJointAttnProcessor2_0

    ref = _torch_sd3(dict(SD3, qk_norm="rms_norm"))
    rng = np.random.default_rng(1)
    args = dict(hidden_states=torch.from_numpy(rng.normal(size=(3, 4, H, W)).astype(np.float32)),
                encoder_hidden_states=torch.from_numpy(rng.normal(size=(3, L, 12)).astype(np.float32)),
                pooled_projections=torch.from_numpy(rng.normal(size=(3, 10)).astype(np.float32)),
                timestep=torch.full((3,), 500.0))
    plain = ref(**args).sample
    ref.transformer_blocks[1].attn.set_processor(PAGCFGJointAttnProcessor2_0())
    pag = ref(**args).sample
    assert (pag[:2] - plain[:2]).abs().max() > 1e-3  # unperturbed rows changed: qk norm skipped

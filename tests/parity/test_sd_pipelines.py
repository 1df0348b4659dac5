"""Text prompts -> images from diffusers StableDiffusion / StableDiffusionXL / StableDiffusion3
pipeline folders vs the diffusers pipelines themselves (tiny random models, tokenizers built
offline, 3 sampling steps, 16x16 images)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jdpt.diffusion.samplers import ddim_sample
from jdpt.diffusion.schedules import inference_timesteps
from jdpt.diffusion.sd_pipeline import sd3_text_to_image, sd_generate, sd_text_to_image, sdxl_text_to_image
from jdpt.diffusion.sd_pipeline_parts import (
    SD3Scheduler,
    ddim_schedule,
    load_sd3_pipeline,
    load_sd_pipeline,
    load_sdxl_pipeline,
)
from jdpt.weights.files import WeightsError
from tests.parity import test_sd_prompts
from tests.parity.test_pipeline import VAE
from tests.parity.test_sd3 import CONFIGS as SD3_CONFIGS
from tests.parity.test_sd_prompts import (
    G_DIM,
    L_DIM,
    NEGATIVE,
    NEGATIVE_2,
    PROMPTS,
    PROMPTS_2,
    PROMPTS_3,
    T5_DIM,
    T5_LEN,
    _randomized,
)
from tests.reference import torch_module

encoders = test_sd_prompts.encoders  # the fixture: random torch CLIP-L/CLIP-G/T5 and tokenizers
STEPS, SIZE = 3, 16  # the VAE halves: 8x8 latents
# UNets smaller than test_unet.py's (compile time): one cross-attention block and one plain
UNET = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, attention_head_dim=2,
            sample_size=SIZE // 2)
SD_UNET = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=L_DIM)
SDXL_UNET = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=L_DIM + G_DIM,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8)
SD_VAE = dict(VAE, shift_factor=None)  # the SD/SDXL pipelines ignore shift_factor; SD3 uses it
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                set_alpha_to_one=False, steps_offset=1)
# hub scheduler configs: SD 1.5 (PNDM), SDXL base (Euler), and PNDM with every default
SD15_PNDM = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
SDXL_EULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
              "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
              "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
              "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
V_TRAILING = {"_class_name": "DDIMScheduler", **SD_BETAS, "prediction_type": "v_prediction",
              "timestep_spacing": "trailing"}


def _unet(**config):
    from diffusers import UNet2DConditionModel

    return _randomized(UNet2DConditionModel(**UNET, **config))


def _vae(**config):
    from diffusers import AutoencoderKL

    return _randomized(AutoencoderKL(**config))


def _noise(seed: int) -> np.ndarray:
    """NHWC initial noise for two 16x16 images (4 latent channels)."""
    return np.random.default_rng(seed).normal(size=(2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)


def _diffusers_images(pipe, noise: np.ndarray, **kwargs) -> np.ndarray:
    torch = torch_module()
    latents = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2)))
    return pipe(latents=latents, num_inference_steps=STEPS, output_type="np", **kwargs).images


def _assert_same_images(ours, ref: np.ndarray, what: str) -> np.ndarray:
    """uint8 images equal to diffusers' float images up to rounding-boundary flips."""
    ours = np.asarray(ours)
    ref_uint8 = (ref * 255).round().astype(np.uint8)
    assert ours.shape == ref_uint8.shape and ours.dtype == np.uint8, (ours.shape, ours.dtype)
    diff = np.abs(ours.astype(int) - ref_uint8.astype(int))
    print(f"{what}: max pixel difference {diff.max()}, {(diff > 0).mean():.2%} of pixels differ")
    assert diff.max() <= 1, f"{what}: max pixel difference {diff.max()}"
    assert (diff > 0).mean() < 0.01, f"{what}: {(diff > 0).mean():.2%} of pixels differ"
    assert ours.std() > 10, f"{what}: flat images cannot show a difference"
    return ours


def _assert_differ(a, b, what: str) -> None:
    assert np.abs(np.asarray(a, int) - np.asarray(b, int)).max() > 8, what


@pytest.fixture(scope="module")
def sd(encoders, tmp_path_factory):
    """(diffusers StableDiffusionPipeline with a DDIM scheduler as SD configures it, its folder)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch_module().manual_seed(1)
    pipe = StableDiffusionPipeline(
        vae=_vae(**SD_VAE), text_encoder=encoders.torch["clip_l"], tokenizer=encoders.tok["l"],
        unet=_unet(**SD_UNET), scheduler=DDIMScheduler(**SD_BETAS),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("sd") / "pipeline"
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def sdxl(encoders, tmp_path_factory):
    """(diffusers StableDiffusionXLPipeline with a v-prediction, trailing DDIM scheduler, folder)."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    torch_module().manual_seed(2)
    pooled = encoders.torch["clip_g"].config.projection_dim
    unet = _unet(**SDXL_UNET, projection_class_embeddings_input_dim=pooled + 6 * 8)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(**SD_VAE), text_encoder=encoders.torch["clip_l"],
        text_encoder_2=encoders.torch["clip_g"], tokenizer=encoders.tok["l"],
        tokenizer_2=encoders.tok["g"], unet=unet,
        scheduler=DDIMScheduler.from_config(V_TRAILING), add_watermarker=False)
    folder = tmp_path_factory.mktemp("sdxl") / "pipeline"
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def sd3(encoders, tmp_path_factory):
    """(diffusers StableDiffusion3Pipeline with SD3's shift-3 flow scheduler, its folder)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch_module().manual_seed(3)
    cfg = {k: v for k, v in SD3_CONFIGS["sd3"].items() if k not in ("latent", "text")}
    pooled = (encoders.torch["clip_l_proj"].config.projection_dim
              + encoders.torch["clip_g"].config.projection_dim)
    transformer = _randomized(SD3Transformer2DModel(**cfg | dict(
        num_layers=2, joint_attention_dim=T5_DIM, pooled_projection_dim=pooled)))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(**VAE), text_encoder=encoders.torch["clip_l_proj"], tokenizer=encoders.tok["l"],
        text_encoder_2=encoders.torch["clip_g"], tokenizer_2=encoders.tok["g"],
        text_encoder_3=encoders.torch["t5"], tokenizer_3=encoders.tok["t5"])
    folder = tmp_path_factory.mktemp("sd3") / "pipeline"
    pipe.save_pretrained(folder)
    return pipe, folder


def test_sd_text_to_image_matches_diffusers(sd):
    pipe, folder = sd
    parts = load_sd_pipeline(folder)
    assert parts.schedule.prediction_type == "epsilon" and parts.schedule.steps_offset == 1
    noise = _noise(0)
    ref = _diffusers_images(pipe, noise, prompt=PROMPTS, negative_prompt=NEGATIVE, guidance_scale=7.5)
    # height and width default to unet.config.sample_size times the VAE's downsampling, as diffusers
    images = _assert_same_images(sd_text_to_image(parts, PROMPTS, negative_prompts=NEGATIVE,
                                                  latents=noise, num_inference_steps=STEPS),
                                 ref, "sd cfg 7.5")
    weaker = sd_text_to_image(parts, PROMPTS, negative_prompts=NEGATIVE, latents=noise,
                              num_inference_steps=STEPS, guidance_scale=2.0)
    _assert_differ(images, weaker, "the guidance scale must change the images")
    ref = _diffusers_images(pipe, noise, prompt=PROMPTS, guidance_scale=1.0)  # no guidance
    _assert_same_images(sd_text_to_image(parts, PROMPTS, latents=noise, num_inference_steps=STEPS,
                                         guidance_scale=1.0), ref, "sd without guidance")
    with pytest.raises(ValueError, match=r"negative_prompts are used only with guidance_scale > 1 "
                                         r"\(got 1.0\)"):
        sd_text_to_image(parts, PROMPTS, negative_prompts=NEGATIVE, latents=noise, guidance_scale=1.0)
    with pytest.raises(ValueError, match=r"height=14 and width=16 must be multiples of 4 \(the VAE's "
                                         r"downsampling 2 times the UNet's 2\)"):
        sd_text_to_image(parts, PROMPTS, latents=noise, height=14, width=16)
    with pytest.raises(ValueError, match=r"latents must be NHWC noise \(2, 8, 8, 4\) .* It looks NCHW"):
        sd_text_to_image(parts, PROMPTS, latents=noise.transpose(0, 3, 1, 2),
                         num_inference_steps=STEPS)
    with pytest.raises(ValueError, match=r"DDIM with eta=0.5 is stochastic: pass key="):
        sd_text_to_image(parts, PROMPTS, latents=noise, num_inference_steps=STEPS, eta=0.5)
    kw = dict(schedule=parts.schedule, latents=noise, height=SIZE, width=SIZE)
    embeds = np.zeros((2, 77, L_DIM), np.float32)
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds / add_time_ids given to a UNet without "
                                         r"SDXL's added embedding"):
        sd_generate(parts.unet, parts.vae, embeds, pooled_prompt_embeds=np.zeros((2, 20)), **kw)
    with pytest.raises(ValueError, match=r"negative_prompt_embeds \(2, 70, 16\) must match prompt_embeds "
                                         r"\(2, 77, 16\)"):
        sd_generate(parts.unet, parts.vae, embeds, negative_prompt_embeds=embeds[:, :70], **kw)


def test_sdxl_text_to_image_matches_diffusers(sdxl):
    """v-prediction, trailing spacing, guidance rescale, second prompts, clip_skip and size
    conditioning; then the zero unconditional embeddings of an absent negative prompt."""
    pipe, folder = sdxl
    parts = load_sdxl_pipeline(folder)
    assert parts.schedule.prediction_type == "v_prediction" and parts.force_zeros_for_empty_prompt
    noise = _noise(1)
    common = dict(height=SIZE, width=SIZE, guidance_scale=5.0, guidance_rescale=0.7)
    sizes = dict(original_size=(32, 24), crops_coords_top_left=(2, 4))
    ref = _diffusers_images(pipe, noise, prompt=PROMPTS, prompt_2=PROMPTS_2, negative_prompt=NEGATIVE,
                            negative_prompt_2=NEGATIVE_2, clip_skip=1, **sizes, **common)
    images = _assert_same_images(sdxl_text_to_image(
        parts, PROMPTS, prompts_2=PROMPTS_2, negative_prompts=NEGATIVE, negative_prompts_2=NEGATIVE_2,
        clip_skip=1, latents=noise, num_inference_steps=STEPS, **sizes, **common), ref, "sdxl negatives")
    ref = _diffusers_images(pipe, noise, prompt=PROMPTS, **common)
    zeros = _assert_same_images(sdxl_text_to_image(parts, PROMPTS, latents=noise, num_inference_steps=STEPS,
                                                   **common), ref, "sdxl zero negatives")
    _assert_differ(images, zeros, "negative prompts must change the images")
    with pytest.raises(ValueError, match=r"an SDXL UNet \(addition_embed_type='text_time'\) needs "
                                         r"pooled_prompt_embeds"):
        sd_generate(parts.unet, parts.vae, np.zeros((2, 77, L_DIM + G_DIM), np.float32),
                    schedule=parts.schedule, latents=noise, height=SIZE, width=SIZE)


def test_sd3_text_to_image_matches_diffusers(sd3):
    pipe, folder = sd3
    parts = load_sd3_pipeline(folder)
    assert parts.scheduler == SD3Scheduler(shift=3.0) and parts.t5 is not None
    noise = _noise(2)
    common = dict(height=SIZE, width=SIZE, guidance_scale=7.0, max_sequence_length=T5_LEN)
    ref = _diffusers_images(pipe, noise, prompt=PROMPTS, prompt_2=PROMPTS_2, prompt_3=PROMPTS_3,
                            negative_prompt=NEGATIVE, negative_prompt_2=NEGATIVE_2, **common)
    images = _assert_same_images(sd3_text_to_image(
        parts, PROMPTS, prompts_2=PROMPTS_2, prompts_3=PROMPTS_3, negative_prompts=NEGATIVE,
        negative_prompts_2=NEGATIVE_2, latents=noise, num_inference_steps=STEPS, **common), ref, "sd3")
    weaker = sd3_text_to_image(parts, PROMPTS, prompts_2=PROMPTS_2, prompts_3=PROMPTS_3,
                               negative_prompts=NEGATIVE, negative_prompts_2=NEGATIVE_2, latents=noise,
                               num_inference_steps=STEPS, **common | dict(guidance_scale=2.0))
    _assert_differ(images, weaker, "the guidance scale must change the images")
    with pytest.raises(ValueError, match=r"height=16 and width=18 must be multiples of 4 \(the VAE's "
                                         r"downsampling 2 times the transformer's patch 2\)"):
        sd3_text_to_image(parts, PROMPTS, latents=noise, **common | dict(width=18))


def test_sd3_without_t5_matches_diffusers(sd3, tmp_path):
    """A folder without text_encoder_3 loads with t5=None; zeros replace the T5 tokens."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**{**sd3[0].components, "text_encoder_3": None, "tokenizer_3": None})
    pipe.save_pretrained(tmp_path / "pipeline")
    parts = load_sd3_pipeline(tmp_path / "pipeline")
    assert parts.t5 is None and parts.t5_tokenizer is None
    noise = _noise(3)
    common = dict(height=SIZE, width=SIZE, guidance_scale=4.0, max_sequence_length=T5_LEN)
    ref = _diffusers_images(pipe, noise, prompt=PROMPTS, negative_prompt=NEGATIVE, **common)
    _assert_same_images(sd3_text_to_image(parts, PROMPTS, negative_prompts=NEGATIVE, latents=noise,
                                          num_inference_steps=STEPS, **common), ref, "sd3 without T5")


@pytest.mark.parametrize("raw", [SD15_PNDM, SDXL_EULER, V_TRAILING, {"_class_name": "PNDMScheduler"}],
                         ids=["sd15-pndm", "sdxl-euler", "v-trailing", "pndm-defaults"])
def test_ddim_schedule_matches_diffusers_ddim_from_config(raw):
    """Our DDIM run over a folder's scheduler config = diffusers' DDIMScheduler.from_config loop."""
    torch = torch_module()
    from diffusers import DDIMScheduler

    ref = DDIMScheduler.from_config(raw)
    schedule = ddim_schedule(raw)
    np.testing.assert_allclose(schedule.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6)
    assert schedule.final_alpha_cumprod == pytest.approx(float(ref.final_alpha_cumprod))
    for steps in (STEPS, 50):
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(inference_timesteps(schedule, steps), ref.timesteps.numpy())

    def denoise(x, t):  # a made-up model, large enough to hit DDIM's clipping where it is on
        return jnp.sin(3 * x) + t / 500

    x = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32) * 2
    ours = ddim_sample(denoise, x, schedule, STEPS)
    ref_x = torch.from_numpy(x)
    ref.set_timesteps(STEPS)
    for t in ref.timesteps:
        prediction = np.array(denoise(ref_x.numpy(), t.item()))
        ref_x = ref.step(torch.from_numpy(prediction), t, ref_x).prev_sample
    np.testing.assert_allclose(ours, ref_x.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", [dict(shift=3.0), dict(shift=3.0, use_dynamic_shifting=True)],
                         ids=["sd3", "dynamic"])
@pytest.mark.parametrize("steps,seq_len", [(STEPS, 16), (28, 4096)])
def test_sd3_scheduler_sigmas_match_diffusers(config, steps, seq_len):
    torch_module()
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    ref = FlowMatchEulerDiscreteScheduler(**config)
    ours = SD3Scheduler.from_config(dict(ref.config))
    c = ref.config
    mu = (calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
          if c.use_dynamic_shifting else None)
    ref.set_timesteps(steps, mu=mu)
    np.testing.assert_allclose(ours.sigmas(steps, seq_len), ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)


_CLASSES = {
    "StableDiffusionPipeline": dict(unet=["diffusers", "UNet2DConditionModel"],
                                    vae=["diffusers", "AutoencoderKL"],
                                    text_encoder=["transformers", "CLIPTextModel"],
                                    tokenizer=["transformers", "CLIPTokenizer"],
                                    scheduler=["diffusers", "PNDMScheduler"],
                                    safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"]),
    "StableDiffusionXLPipeline": dict(unet=["diffusers", "UNet2DConditionModel"],
                                      vae=["diffusers", "AutoencoderKL"],
                                      text_encoder=["transformers", "CLIPTextModel"],
                                      tokenizer=["transformers", "CLIPTokenizer"],
                                      text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                                      tokenizer_2=["transformers", "CLIPTokenizer"],
                                      scheduler=["diffusers", "EulerDiscreteScheduler"]),
    "StableDiffusion3Pipeline": dict(transformer=["diffusers", "SD3Transformer2DModel"],
                                     vae=["diffusers", "AutoencoderKL"],
                                     text_encoder=["transformers", "CLIPTextModelWithProjection"],
                                     tokenizer=["transformers", "CLIPTokenizer"],
                                     text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                                     tokenizer_2=["transformers", "CLIPTokenizer"],
                                     text_encoder_3=["transformers", "T5EncoderModel"],
                                     tokenizer_3=["transformers", "T5TokenizerFast"],
                                     scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"]),
}
_LOADERS = {"StableDiffusionPipeline": load_sd_pipeline, "StableDiffusionXLPipeline": load_sdxl_pipeline,
            "StableDiffusion3Pipeline": load_sd3_pipeline}
SD, SDXL, SD3 = _LOADERS


@pytest.mark.parametrize("loader,folder_class,changes,scheduler,match", [
    (SD, SD, None, {}, r"has no model_index.json.*single model folder: load it with jdpt.from_diffusers"),
    (SD, SDXL, {}, {}, r"pipeline class 'StableDiffusionXLPipeline' is not a StableDiffusionPipeline; "
                       r"load it with load_sdxl_pipeline"),
    (SD3, "FluxPipeline", {}, {}, r"'FluxPipeline' is not a StableDiffusion3Pipeline; load it with "
                                  r"load_flux_pipeline"),
    (SD, SD, {"scheduler": ["diffusers", "LMSDiscreteScheduler"]}, {},
     r"'scheduler' is \['diffusers', 'LMSDiscreteScheduler'\]; jdpt's StableDiffusionPipeline loader "
     r"needs one of \['DDIMScheduler', 'PNDMScheduler', 'EulerDiscreteScheduler'\] \(set pipe.scheduler "
     r"= DDIMScheduler.from_config"),
    (SDXL, SDXL, {"text_encoder": [None, None], "tokenizer": [None, None]}, {},
     r"no 'text_encoder' component \(text_encoder: \[None, None\]\)"),
    (SDXL, SDXL, {"text_encoder_2": ["transformers", "CLIPTextModel"]}, {},
     r"'text_encoder_2' is \['transformers', 'CLIPTextModel'\]; .*needs one of "
     r"\['CLIPTextModelWithProjection'\]"),
    (SD3, SD3, {"transformer": ["diffusers", "FluxTransformer2DModel"]}, {},
     r"needs one of \['SD3Transformer2DModel'\]"),
    (SD3, SD3, {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "_missing": True}, {},
     r"lacks the subfolders \['text_encoder_2'\] that model_index.json names"),
    (SD3, SD3, {"tokenizer_3": None}, {}, r"text_encoder_3 and tokenizer_3 come together"),
    (SD, SD, {"_no_scheduler_config": True}, {}, r"scheduler_config.json' is missing"),
    (SD, SD, {}, {"thresholding": True}, r"scheduler_config.json: thresholding=True is not implemented "
                                         r"by jdpt's DDIM sampler"),
    (SDXL, SDXL, {}, {"beta_schedule": "sigmoid"}, r"scheduler_config.json: unknown beta_schedule "
                                                   r"'sigmoid'"),
    (SD3, SD3, {}, {"use_karras_sigmas": True}, r"scheduler_config.json: use_karras_sigmas=True is not "
                                                r"implemented by jdpt's SD3 sampler"),
], ids=["model_folder", "sdxl_as_sd", "flux_as_sd3", "lms", "sdxl_refiner", "clip_g_without_projection",
        "flux_transformer", "missing_subfolder", "t5_without_tokenizer", "no_scheduler_config", "thresholding", "sigmoid_betas",
        "karras"])
def test_bad_pipeline_folders_raise(tmp_path, loader, folder_class, changes, scheduler, match):
    folder = tmp_path / "pipe"
    folder.mkdir()
    changes = dict(changes or {}) if changes is not None else None
    flags = {k: changes.pop(k) for k in list(changes or {}) if k.startswith("_")}
    components = {**_CLASSES.get(folder_class, _CLASSES[SD3]), **(changes or {})}
    if changes is None:
        (folder / "config.json").write_text("{}")
    else:
        (folder / "model_index.json").write_text(json.dumps({"_class_name": folder_class, **components}))
    for name, entry in components.items():
        if entry and entry[1] is not None and not (flags.get("_missing") and name == "text_encoder_2"):
            (folder / name).mkdir()
    if not flags.get("_no_scheduler_config"):
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    with pytest.raises(WeightsError, match=match):
        _LOADERS[loader](folder)


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3"])
def test_cli_samples_sd_family_folders(name, request, tmp_path):
    """``jdpt sample`` dispatches on model_index.json: the PNG holds the images the pipeline's own
    text-to-image function gives for the same seed, size, steps and guidance."""
    import jax
    from PIL import Image

    from jdpt import cli

    folder = request.getfixturevalue(name)[1]
    out = tmp_path / f"{name}.png"
    assert cli.main(["sample", "--model", str(folder), "--prompt", PROMPTS[0], "--out", str(out), "--n", "2",
                     "--size", "16", "--steps", "2", "--guidance", "3.0", "--seed", "5"]) == 0
    loader, generate = {"sd": (load_sd_pipeline, sd_text_to_image),
                        "sdxl": (load_sdxl_pipeline, sdxl_text_to_image),
                        "sd3": (load_sd3_pipeline, sd3_text_to_image)}[name]
    images = generate(loader(folder), [PROMPTS[0]] * 2, key=jax.random.key(5), height=16, width=16,
                      num_inference_steps=2, guidance_scale=3.0)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.concatenate(list(np.asarray(images)), axis=1))

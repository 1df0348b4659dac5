"""Text prompts -> images from a diffusers FluxPipeline folder vs diffusers itself (tiny models,
tokenizers built offline)."""

from __future__ import annotations

import json
import logging
import shutil
import string

import numpy as np
import pytest

from jdpt.diffusion.pipeline_parts import FluxScheduler, load_flux_pipeline
from jdpt.diffusion.prompts import encode_flux_prompt, flux_text_to_image
from jdpt.weights.files import WeightsError
from tests.parity.test_pipeline import FLUX, VAE
from tests.reference import assert_parity, torch_module

CLIP_WORDS = ["a", "photo", "of", "red", "cat", "dog", "on", "the", "moon"]
T5_WORDS = CLIP_WORDS + ["blue"]
# The second prompt has 20 T5 tokens with </s>: truncated to MAX_LEN (diffusers warns too).
PROMPTS = ["a photo of a red cat", "a dog on the moon " * 4 + "blue"]
MAX_LEN = 16
CLIP_DIM, T5_DIM = 16, FLUX["joint_attention_dim"]
DEV_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL_SCHEDULER = dict(shift=1.0, use_dynamic_shifting=False)


def _clip_tokenizer(folder):
    """A byte-level BPE CLIP tokenizer: letters, letters + ``</w>``, and merges spelling out
    ``CLIP_WORDS`` as whole-word tokens."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for word in CLIP_WORDS:
        for i in range(2, len(word) + 1):
            left, right = word[: i - 1], word[i - 1] + ("</w>" if i == len(word) else "")
            merges.append(f"{left} {right}")
            vocab.setdefault(left + right, len(vocab))
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def _t5_tokenizer():
    """A word-level stand-in for T5's tokenizer: pad 0, ``</s>`` 1 appended, unknown 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(T5_WORDS)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    """(diffusers FluxPipeline with random tiny models, the folder it was saved to)."""
    torch = torch_module()
    import transformers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tmp = tmp_path_factory.mktemp("flux_text")
    clip_tokenizer = _clip_tokenizer(tmp / "clip_vocab")
    torch.manual_seed(0)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=CLIP_DIM, intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
        eos_token_id=1, pad_token_id=1)).eval()
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(T5_WORDS) + 3, d_model=T5_DIM, d_kv=8, num_heads=2, d_ff=32, num_layers=2,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
        relative_attention_max_distance=12, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0)).eval()
    transformer = FluxTransformer2DModel(**dict(FLUX, pooled_projection_dim=CLIP_DIM),
                                         guidance_embeds=True).eval()
    vae = AutoencoderKL(**VAE).eval()
    for model in (clip, t5, transformer, vae):
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER), vae=vae,
                        text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=t5,
                        tokenizer_2=_t5_tokenizer(), transformer=transformer)
    pipe.save_pretrained(tmp / "pipeline")
    return pipe, tmp / "pipeline"


@pytest.fixture(scope="module")
def parts(saved_pipeline):
    return load_flux_pipeline(saved_pipeline[1])


def test_encode_prompt_matches_diffusers(saved_pipeline, parts, caplog):
    pipe, _ = saved_pipeline
    with caplog.at_level(logging.WARNING, logger="jdpt.diffusion.prompts"):
        embeds, pooled = encode_flux_prompt(
            PROMPTS, clip=parts.clip, clip_tokenizer=parts.clip_tokenizer, t5=parts.t5,
            t5_tokenizer=parts.t5_tokenizer, max_sequence_length=MAX_LEN)
    assert "T5 keeps 16 tokens" in caplog.text and PROMPTS[1] in caplog.text
    ref_embeds, ref_pooled, _ = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None,
                                                   max_sequence_length=MAX_LEN)
    assert embeds.shape == (2, MAX_LEN, T5_DIM) and pooled.shape == (2, CLIP_DIM)
    assert_parity(embeds, ref_embeds, what="prompt_embeds")
    assert_parity(pooled, ref_pooled, what="pooled_prompt_embeds")
    single, _ = encode_flux_prompt(PROMPTS[0], clip=parts.clip, clip_tokenizer=parts.clip_tokenizer,
                                   t5=parts.t5, t5_tokenizer=parts.t5_tokenizer,
                                   max_sequence_length=MAX_LEN)
    np.testing.assert_allclose(single[0], embeds[0], rtol=1e-5, atol=1e-6)


def test_text_to_image_matches_diffusers(saved_pipeline, parts):
    pipe, _ = saved_pipeline
    torch = torch_module()
    height, width = 16, 24  # latent 8x12 -> 4x6 = 24 packed tokens
    noise = np.random.default_rng(0).normal(size=(2, 24, FLUX["in_channels"])).astype(np.float32)
    ref = pipe(prompt=PROMPTS, latents=torch.from_numpy(noise), height=height, width=width,
               num_inference_steps=4, guidance_scale=3.5, max_sequence_length=MAX_LEN,
               output_type="np").images
    ref_uint8 = (ref * 255).round().astype(np.uint8)
    images = np.asarray(flux_text_to_image(parts, PROMPTS, latents=noise, height=height, width=width,
                                           num_inference_steps=4, guidance_scale=3.5,
                                           max_sequence_length=MAX_LEN))
    assert images.shape == (2, height, width, 3) and images.dtype == np.uint8
    diff = np.abs(images.astype(int) - ref_uint8.astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}"  # only rounding-boundary flips
    assert (diff > 0).mean() < 0.01
    with pytest.raises(ValueError, match=r"height=18 and width=24 must be multiples of 4"):
        flux_text_to_image(parts, PROMPTS, latents=noise, height=18, width=width)


def test_true_cfg_and_second_prompts_match_diffusers(saved_pipeline, parts):
    """prompt_2 (T5), negative prompts and true CFG as diffusers' FluxPipeline."""
    pipe, _ = saved_pipeline
    torch = torch_module()
    noise = np.random.default_rng(1).normal(size=(2, 4, FLUX["in_channels"])).astype(np.float32)
    kw = dict(height=8, width=8, num_inference_steps=3, guidance_scale=3.5, max_sequence_length=MAX_LEN)
    ref = pipe(prompt=PROMPTS, prompt_2=["blue moon", "red dog"], negative_prompt="a cat",
               negative_prompt_2=["the dog", "blue"], true_cfg_scale=2.5,
               latents=torch.from_numpy(noise), output_type="np", **kw).images
    images = np.asarray(flux_text_to_image(
        parts, PROMPTS, prompts_2=["blue moon", "red dog"], negative_prompts="a cat",
        negative_prompts_2=["the dog", "blue"], true_cfg_scale=2.5, latents=noise, **kw))
    diff = np.abs(images.astype(int) - (ref * 255).round().astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}"
    plain = np.asarray(flux_text_to_image(parts, PROMPTS, prompts_2=["blue moon", "red dog"],
                                          latents=noise, **kw))
    assert np.abs(plain.astype(int) - images).max() > 8, "true CFG must change the images"
    with pytest.raises(ValueError, match=r"true_cfg_scale=2.0 needs negative_prompts"):
        flux_text_to_image(parts, PROMPTS, latents=noise, true_cfg_scale=2.0, **kw)
    with pytest.raises(ValueError, match=r"negative_prompts are used only with true_cfg_scale > 1"):
        flux_text_to_image(parts, PROMPTS, latents=noise, negative_prompts="x", **kw)
    with pytest.raises(ValueError, match=r"negative_prompts_2 has 3 prompts but prompts has 2"):
        flux_text_to_image(parts, PROMPTS, latents=noise, negative_prompts="x",
                           negative_prompts_2=["a", "b", "c"], true_cfg_scale=2.0, **kw)


def test_loads_hub_repo_id_from_cache(saved_pipeline, tmp_path):
    """A repo id resolves from the local Hugging Face cache (a snapshot folder), offline."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--tiny--flux"
    shutil.copytree(saved_pipeline[1], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    parts = load_flux_pipeline("tiny/flux", cache_dir=tmp_path)
    assert type(parts.transformer).__name__ == "FluxTransformer"
    assert parts.scheduler == FluxScheduler(**DEV_SCHEDULER)
    with pytest.raises(WeightsError, match=r"'tiny/other' is neither a local folder nor in the"):
        load_flux_pipeline("tiny/other", cache_dir=tmp_path)


@pytest.mark.parametrize("config", [DEV_SCHEDULER, SCHNELL_SCHEDULER], ids=["dev", "schnell"])
@pytest.mark.parametrize("steps,seq_len", [(4, 24), (28, 4096), (1, 1024)])
def test_scheduler_sigmas_match_diffusers(config, steps, seq_len):
    torch_module()
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    ref = FlowMatchEulerDiscreteScheduler(**config)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq_len))
    ours = FluxScheduler.from_config(dict(ref.config)).sigmas(steps, seq_len)
    np.testing.assert_allclose(ours, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)


def _index(**changes) -> dict:
    index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.42.0",
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    return {**index, **changes}


@pytest.mark.parametrize("case,match", [
    ("no_folder", r"pipeline folder '.*nowhere' does not exist; pass a local pipeline folder"),
    ("model_folder", r"has no model_index.json.*single model folder: load it with jdpt.from_diffusers"),
    ("sd3", r"pipeline class 'StableDiffusion3Pipeline' is not a FluxPipeline; load it with "
            r"load_sd3_pipeline"),
    ("no_t5", r"no 'text_encoder_2' component \(text_encoder_2: \[None, None\]\)"),
    ("clip_with_projection", r"'text_encoder' is \['transformers', 'CLIPTextModelWithProjection'\]; "
                             r".*needs one of \['CLIPTextModel'\]"),
    ("missing_subfolders", r"lacks the subfolders \['text_encoder_2', 'tokenizer_2'\] that "
                           r"model_index.json names; download the whole pipeline"),
    ("karras", r"scheduler_config.json: use_karras_sigmas=True is not implemented by jdpt's Flux"),
])
def test_bad_pipeline_folders_raise(tmp_path, case, match):
    folder = tmp_path / "pipe"
    folder.mkdir()
    index = {
        "sd3": _index(_class_name="StableDiffusion3Pipeline"),
        "no_t5": _index(text_encoder_2=[None, None]),
        "clip_with_projection": _index(text_encoder=["transformers", "CLIPTextModelWithProjection"]),
    }.get(case, _index())
    if case == "model_folder":
        (folder / "config.json").write_text("{}")
    elif case != "no_folder":
        (folder / "model_index.json").write_text(json.dumps(index))
    for name in index:
        if not name.startswith("_") and not (case == "missing_subfolders" and name.endswith("_2")):
            (folder / name).mkdir()
    scheduler = dict(DEV_SCHEDULER, use_karras_sigmas=case == "karras")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    with pytest.raises(WeightsError, match=match):
        load_flux_pipeline(tmp_path / "nowhere" if case == "no_folder" else folder)


def test_bad_prompt_arguments_raise(parts):
    kw = dict(clip=parts.clip, clip_tokenizer=parts.clip_tokenizer, t5=parts.t5,
              t5_tokenizer=parts.t5_tokenizer)
    with pytest.raises(ValueError, match=r"max_sequence_length=513 must be in \[1, 512\]"):
        encode_flux_prompt(PROMPTS, max_sequence_length=513, **kw)
    with pytest.raises(ValueError, match=r"non-empty list of strings; got \[\]"):
        encode_flux_prompt([], **kw)
    long_clip = type(parts.clip_tokenizer).from_pretrained(parts.clip_tokenizer.name_or_path,
                                                           model_max_length=100)
    with pytest.raises(ValueError, match=r"model_max_length=100 exceeds the CLIP model's "
                                         r"max_position_embeddings=77"):
        encode_flux_prompt(PROMPTS, **dict(kw, clip_tokenizer=long_clip))


def test_cli_samples_a_pipeline_folder(saved_pipeline, tmp_path):
    from PIL import Image

    from jdpt import cli

    out = tmp_path / "flux.png"
    assert cli.main(["sample", "--model", str(saved_pipeline[1]), "--prompt", PROMPTS[0], "--out", str(out),
                     "--n", "2", "--size", "16", "--steps", "2"]) == 0
    assert Image.open(out).size == (32, 16)
    with pytest.raises(SystemExit, match="model_index.json"):
        cli.main(["sample", "--model", str(tmp_path), "--prompt", "x", "--out", str(out)])

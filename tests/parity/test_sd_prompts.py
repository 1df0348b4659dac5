"""SD 1.x / SDXL / SD3 prompt embeddings vs the diffusers pipelines' ``encode_prompt`` (tiny random
CLIP-L, CLIP-G and T5 encoders, tokenizers built offline)."""

from __future__ import annotations

import json
import logging
import string
import types

import numpy as np
import pytest

import jdpt
from jdpt.diffusion.prompts import (
    PromptEmbeds,
    embed_sd3_tokens,
    encode_sd3_prompt,
    encode_sd_prompt,
    encode_sdxl_prompt,
    sdxl_time_ids,
    tokenize_sd3_prompt,
)
from tests.parity.test_flux_text_pipeline import T5_WORDS, _t5_tokenizer
from tests.reference import assert_parity, torch_module

WORDS = ["a", "photo", "of", "red", "cat", "dog", "on", "the", "moon", "blurry", "ugly"]
# The second prompt has more than 77 CLIP tokens: truncated (diffusers warns, so do we).
PROMPTS = ["a photo of a red cat", "a dog on the moon " * 16]
PROMPTS_2 = ["the moon", "a red dog on the moon"]
PROMPTS_3 = ["a blue cat", "the red moon"]
NEGATIVE = ["blurry", "ugly photo of a dog"]
NEGATIVE_2 = "ugly"
T5_LEN = 16
L_DIM, G_DIM, T5_DIM = 16, 24, 48  # SD3 pads CLIP's 16 + 24 features to T5's 48


def _clip_tokenizer(folder, pad_token: str | None = None):
    """A byte-level BPE CLIP tokenizer laid out like OpenAI's: ``!`` is id 0, the start and end
    tokens are the two largest ids; merges spell ``WORDS`` as whole-word tokens. SDXL's and SD3's
    second tokenizer pads with ``!``, the first with ``<|endoftext|>``."""
    from transformers import CLIPTokenizer

    vocab = {"!": 0, "!</w>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for word in WORDS:
        for i in range(2, len(word) + 1):
            left, right = word[: i - 1], word[i - 1] + ("</w>" if i == len(word) else "")
            merges.append(f"{left} {right}")
            vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    pad = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77, **pad)


def _randomized(model):
    """Add noise to every parameter (norm scales and biases too), so no mapping bug can hide."""
    torch = torch_module()
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Torch encoders, their jdpt loads (from the folders transformers saved) and tokenizers."""
    torch = torch_module()
    import transformers

    tmp = tmp_path_factory.mktemp("sd_prompts")
    tok_l = _clip_tokenizer(tmp / "tok_l")
    tok_g = _clip_tokenizer(tmp / "tok_g", pad_token="!")
    vocab, eos = len(tok_l), tok_l.eos_token_id
    assert tok_l.pad_token_id == eos and tok_g.pad_token_id == 0 and eos == vocab - 1

    def clip(width, layers, act, eos_token_id, projection_dim=None):
        return transformers.CLIPTextConfig(
            vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
            num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=77,
            hidden_act=act, projection_dim=projection_dim or width, bos_token_id=vocab - 2,
            eos_token_id=eos_token_id, pad_token_id=1)

    torch.manual_seed(0)
    torch_models = {
        # SD 1.x / SDXL CLIP-L: legacy eos_token_id=2 (pool at the largest id, the end token)
        "clip_l": transformers.CLIPTextModel(clip(L_DIM, 3, "quick_gelu", 2)),
        # SD3's CLIP-L: projected, pooled at the first end token
        "clip_l_proj": transformers.CLIPTextModelWithProjection(
            clip(L_DIM, 3, "quick_gelu", eos, 12)),
        # CLIP-G as SDXL/SD3 configure it (gelu, legacy eos rule, projection), one layer less than
        # CLIP-L: clip_skip=1 takes its embeddings output
        "clip_g": transformers.CLIPTextModelWithProjection(clip(G_DIM, 2, "gelu", 2, 20)),
        "t5": transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=len(T5_WORDS) + 3, d_model=T5_DIM, d_kv=8, num_heads=2, d_ff=32,
            num_layers=2, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
            relative_attention_max_distance=12, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0)),
    }
    ours = {}
    for name, model in torch_models.items():
        _randomized(model).save_pretrained(tmp / name)
        ours[name] = jdpt.from_diffusers(tmp / name)
    tokenizers = {"l": tok_l, "g": tok_g, "t5": _t5_tokenizer()}
    return types.SimpleNamespace(torch=torch_models, ours=ours, tok=tokenizers, tmp=tmp)


def _sd_pipe(enc):
    from diffusers import StableDiffusionPipeline

    clip_l = enc.torch["clip_l"]
    # transformers 5 flattened CLIPTextModel, but diffusers 0.42 applies clip_skip's final norm
    # through text_encoder.text_model.final_layer_norm: give it that path.
    clip_l.text_model = types.SimpleNamespace(final_layer_norm=clip_l.final_layer_norm)
    return StableDiffusionPipeline(vae=None, text_encoder=clip_l, tokenizer=enc.tok["l"], unet=None,
                                   scheduler=None, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _sdxl_pipe(enc, *, force_zeros_for_empty_prompt=True, text_encoder_2=None):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=None, text_encoder=enc.torch["clip_l"],
        text_encoder_2=text_encoder_2 or enc.torch["clip_g"], tokenizer=enc.tok["l"],
        tokenizer_2=enc.tok["g"], unet=None, scheduler=None,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)


def _sd3_pipe(enc, *, with_t5: bool):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(  # only its config.joint_attention_dim is read (no T5)
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_DIM, caption_projection_dim=16,
        pooled_projection_dim=32, out_channels=4)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=None, vae=None,
        text_encoder=enc.torch["clip_l_proj"], tokenizer=enc.tok["l"],
        text_encoder_2=enc.torch["clip_g"], tokenizer_2=enc.tok["g"],
        text_encoder_3=enc.torch["t5"] if with_t5 else None,
        tokenizer_3=enc.tok["t5"] if with_t5 else None)


def _check(ours: PromptEmbeds, ref: tuple, case: str) -> None:
    """Compare with diffusers' ``(embeds, negative_embeds, pooled, negative_pooled)``."""
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
             "negative_pooled_prompt_embeds")
    errs = [assert_parity(getattr(ours, name), want, what=f"{case} {name}")
            for name, want in zip(names, ref)]
    print(f"{case}: max relative error {max(errs):.2e}")


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_sd_prompt_matches_diffusers(encoders, clip_skip, caplog):
    enc = encoders
    pipe = _sd_pipe(enc)
    kw = dict(text_encoder=enc.ours["clip_l"], tokenizer=enc.tok["l"], clip_skip=clip_skip)
    for negative in (None, NEGATIVE):
        with caplog.at_level(logging.WARNING, logger="jdpt.diffusion.prompts"):
            embeds, neg = encode_sd_prompt(PROMPTS, negative_prompts=negative, **kw)
        assert "CLIP keeps 77 tokens" in caplog.text and PROMPTS[1] in caplog.text
        want, want_neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=negative,
                                            clip_skip=clip_skip)
        assert embeds.shape == neg.shape == (2, 77, L_DIM)
        errs = (assert_parity(embeds, want, what="prompt_embeds"),
                assert_parity(neg, want_neg, what="negative_prompt_embeds"))
        print(f"sd clip_skip={clip_skip} negative={negative}: max relative error {max(errs):.2e}")
    embeds_1, none = encode_sd_prompt(PROMPTS[0], do_classifier_free_guidance=False, **kw)
    assert none is None and embeds_1.shape == (1, 77, L_DIM)
    np.testing.assert_allclose(embeds_1[0], embeds[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["zeros", "clip_skip-prompt_2-negatives", "empty_negative",
                                  "no_force_zeros"])
def test_sdxl_prompt_matches_diffusers(encoders, case):
    enc = encoders
    force_zeros = case != "no_force_zeros"
    kw = dict(prompt_2=None, negative_prompt=None, negative_prompt_2=None, clip_skip=None)
    if case == "clip_skip-prompt_2-negatives":
        kw = dict(prompt_2=PROMPTS_2, negative_prompt=NEGATIVE, negative_prompt_2=NEGATIVE_2,
                  clip_skip=1)
    elif case == "empty_negative":
        kw["negative_prompt"] = ""
    ours = encode_sdxl_prompt(
        PROMPTS, text_encoder=enc.ours["clip_l"], tokenizer=enc.tok["l"],
        text_encoder_2=enc.ours["clip_g"], tokenizer_2=enc.tok["g"], prompts_2=kw["prompt_2"],
        negative_prompts=kw["negative_prompt"], negative_prompts_2=kw["negative_prompt_2"],
        clip_skip=kw["clip_skip"], force_zeros_for_empty_prompt=force_zeros)
    ref = _sdxl_pipe(enc, force_zeros_for_empty_prompt=force_zeros).encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, **kw)
    assert ours.prompt_embeds.shape == (2, 77, L_DIM + G_DIM)
    assert ours.pooled_prompt_embeds.shape == (2, 20)
    _check(ours, ref, f"sdxl {case}")
    negative_is_zero = not np.any(np.asarray(ours.negative_prompt_embeds))
    assert negative_is_zero == (case == "zeros")
    assert negative_is_zero == (not np.any(np.asarray(ours.negative_pooled_prompt_embeds)))


def test_sdxl_time_ids_match_diffusers():
    torch = torch_module()
    from diffusers import StableDiffusionXLPipeline

    # _get_add_time_ids only reads the UNet's embedding widths, to check them
    unet = types.SimpleNamespace(config=types.SimpleNamespace(addition_time_embed_dim=8),
                                 add_embedding=types.SimpleNamespace(
                                     linear_1=types.SimpleNamespace(in_features=6 * 8 + 20)))
    stub = types.SimpleNamespace(unet=unet)
    sizes = ((1024, 768), (16, 32), (512, 384))
    want = StableDiffusionXLPipeline._get_add_time_ids(stub, *sizes, dtype=torch.float32,
                                                       text_encoder_projection_dim=20)
    got = sdxl_time_ids(*sizes, batch=3)
    assert got.shape == (3, 6)
    np.testing.assert_array_equal(got, want.repeat(3, 1).numpy())
    with pytest.raises(ValueError, match=r"crops_coords_top_left=\(0,\) must be a pair of pixels"):
        sdxl_time_ids((64, 64), (0,), (64, 64), batch=1)
    with pytest.raises(ValueError, match=r"batch=0 must be a positive"):
        sdxl_time_ids((64, 64), (0, 0), (64, 64), batch=0)


def _sd3_kw(enc, **changes) -> dict:
    return dict(clip_l=enc.ours["clip_l_proj"], clip_l_tokenizer=enc.tok["l"],
                clip_g=enc.ours["clip_g"], clip_g_tokenizer=enc.tok["g"], t5=enc.ours["t5"],
                t5_tokenizer=enc.tok["t5"], max_sequence_length=T5_LEN) | changes


@pytest.mark.parametrize("case", ["t5", "t5-clip_skip-prompts_2_3-negatives", "no_t5"])
def test_sd3_prompt_matches_diffusers(encoders, case):
    enc = encoders
    with_t5 = case != "no_t5"
    ref_kw = dict(prompt_2=None, prompt_3=None, negative_prompt=None, negative_prompt_2=None,
                  negative_prompt_3=None, clip_skip=None)
    if case == "t5-clip_skip-prompts_2_3-negatives":
        ref_kw = dict(prompt_2=PROMPTS_2, prompt_3=PROMPTS_3, negative_prompt=NEGATIVE,
                      negative_prompt_2=NEGATIVE_2, negative_prompt_3="blurry cat", clip_skip=1)
    kw = _sd3_kw(enc) if with_t5 else _sd3_kw(enc, t5=None, t5_tokenizer=None,
                                              joint_attention_dim=T5_DIM)
    ours = encode_sd3_prompt(
        PROMPTS, prompts_2=ref_kw["prompt_2"], prompts_3=ref_kw["prompt_3"],
        negative_prompts=ref_kw["negative_prompt"], negative_prompts_2=ref_kw["negative_prompt_2"],
        negative_prompts_3=ref_kw["negative_prompt_3"], clip_skip=ref_kw["clip_skip"], **kw)
    ref = _sd3_pipe(enc, with_t5=with_t5).encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
        max_sequence_length=T5_LEN, **ref_kw)
    assert ours.prompt_embeds.shape == (2, 77 + T5_LEN, T5_DIM)
    assert ours.pooled_prompt_embeds.shape == (2, 12 + 20)
    _check(ours, ref, f"sd3 {case}")
    clip_part, t5_part = ours.prompt_embeds[:, :77], ours.prompt_embeds[:, 77:]
    assert not np.any(np.asarray(clip_part[..., L_DIM + G_DIM:]))  # zero padding to T5's width
    assert np.any(np.asarray(clip_part[..., :L_DIM + G_DIM]))
    assert np.any(np.asarray(t5_part)) == with_t5


def test_clip_g_round_trip_into_diffusers(encoders, tmp_path):
    """Our CLIP-G written with to_diffusers loads in transformers and gives SDXL's embeddings."""
    torch_module()
    import transformers

    enc = encoders
    jdpt.weights.to_diffusers(enc.ours["clip_g"], tmp_path)
    clip_g, info = transformers.CLIPTextModelWithProjection.from_pretrained(
        tmp_path, output_loading_info=True)
    assert not any(info.values()), f"transformers loading problems: {info}"
    ref = _sdxl_pipe(enc, text_encoder_2=clip_g.eval()).encode_prompt(
        PROMPTS, prompt_2=PROMPTS_2, device="cpu", num_images_per_prompt=1,
        do_classifier_free_guidance=True, negative_prompt=NEGATIVE)
    ours = encode_sdxl_prompt(PROMPTS, text_encoder=enc.ours["clip_l"], tokenizer=enc.tok["l"],
                              text_encoder_2=enc.ours["clip_g"], tokenizer_2=enc.tok["g"],
                              prompts_2=PROMPTS_2, negative_prompts=NEGATIVE)
    _check(ours, ref, "sdxl round trip")


def test_bad_arguments_raise(encoders):
    enc = encoders
    xl = dict(text_encoder=enc.ours["clip_l"], tokenizer=enc.tok["l"],
              text_encoder_2=enc.ours["clip_g"], tokenizer_2=enc.tok["g"])
    with pytest.raises(ValueError, match=r"negative_prompts has 3 prompts but prompts has 2; pass "
                                         r"one string \(used for every prompt\) or a list of 2"):
        encode_sdxl_prompt(PROMPTS, negative_prompts=["a", "b", "c"], **xl)
    with pytest.raises(ValueError, match=r"prompts_2 has 1 prompts but prompts has 2"):
        encode_sdxl_prompt(PROMPTS, prompts_2=["a"], **xl)
    with pytest.raises(ValueError, match=r"non-empty list of strings; got \[\]"):
        encode_sdxl_prompt([], **xl)
    with pytest.raises(ValueError, match=r"negative_prompts given with do_classifier_free_guidance"
                                         r"=False; .*drop them"):
        encode_sd_prompt(PROMPTS, text_encoder=enc.ours["clip_l"], tokenizer=enc.tok["l"],
                         negative_prompts="x", do_classifier_free_guidance=False)
    with pytest.raises(ValueError, match=r"clip_skip=2 must be None or an integer in \[0, 1\] for "
                                         r"a CLIP encoder with num_hidden_layers=2"):
        encode_sdxl_prompt(PROMPTS, clip_skip=2, **xl)  # in range for CLIP-L, not for CLIP-G
    with pytest.raises(ValueError, match=r"text_encoder_2 is a CLIPTextModel, but its text_embeds "
                                         r"are the pooled vector"):
        encode_sdxl_prompt(PROMPTS, **dict(xl, text_encoder_2=enc.ours["clip_l"]))
    short = type(enc.tok["g"]).from_pretrained(enc.tmp / "tok_g", model_max_length=64)
    with pytest.raises(ValueError, match=r"tokenizer.model_max_length=77 != tokenizer_2."
                                         r"model_max_length=64; .*same length"):
        encode_sdxl_prompt(PROMPTS, **dict(xl, tokenizer_2=short))
    long = type(enc.tok["l"]).from_pretrained(enc.tmp / "tok_l", model_max_length=100)
    with pytest.raises(ValueError, match=r"clip_l_tokenizer.model_max_length=100 exceeds the CLIP "
                                         r"model's max_position_embeddings=77"):
        encode_sd3_prompt(PROMPTS, **_sd3_kw(enc, clip_l_tokenizer=long))

    with pytest.raises(ValueError, match=r"without T5, .*pass joint_attention_dim="):
        encode_sd3_prompt(PROMPTS, **_sd3_kw(enc, t5=None))
    with pytest.raises(ValueError, match=r"CLIP-L \+ CLIP-G width 16 \+ 24 = 40 exceeds the T5 "
                                         r"width 32"):
        encode_sd3_prompt(PROMPTS, **_sd3_kw(enc, t5=None, joint_attention_dim=32))
    with pytest.raises(ValueError, match=r"the T5 width d_model=48 differs from "
                                         r"joint_attention_dim=4096"):
        encode_sd3_prompt(PROMPTS, **_sd3_kw(enc, joint_attention_dim=4096))
    with pytest.raises(ValueError, match=r"t5 given without t5_tokenizer"):
        encode_sd3_prompt(PROMPTS, **_sd3_kw(enc, t5_tokenizer=None))
    with pytest.raises(ValueError, match=r"max_sequence_length=600 must be in \[1, 512\]"):
        encode_sd3_prompt(PROMPTS, **_sd3_kw(enc, max_sequence_length=600))
    ids = tokenize_sd3_prompt(PROMPTS, clip_l_tokenizer=enc.tok["l"], clip_g_tokenizer=enc.tok["g"],
                              t5_tokenizer=enc.tok["t5"], max_sequence_length=T5_LEN)
    with pytest.raises(ValueError, match=r"t5_ids has 16 tokens but max_sequence_length=256"):
        embed_sd3_tokens(enc.ours["clip_l_proj"], enc.ours["clip_g"], enc.ours["t5"], *ids)
    with pytest.raises(ValueError, match=r"t5 is None but t5_ids is given; pass both"):
        embed_sd3_tokens(enc.ours["clip_l_proj"], enc.ours["clip_g"], None, *ids)


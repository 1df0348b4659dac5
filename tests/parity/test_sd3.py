"""SD3Transformer vs diffusers SD3Transformer2DModel on small random configs (fp32, CPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdpt
from jdpt.models.attention import AttentionPlan, LayerPlans, attention_layer_names
from jdpt.models.sd3 import SD3Config, SD3Transformer
from tests.reference import assert_parity, torch_module

CONFIGS = {
    # SD3-like: no qk norm, no dual attention; 8x8 latent = 4x4 patches cropped from a 6x6 grid
    "sd3": dict(sample_size=8, patch_size=2, in_channels=4, num_layers=5, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                pooled_projection_dim=10, out_channels=4, pos_embed_max_size=6,
                latent=(8, 8), text=5),
    # SD3.5-medium-like: RMS qk norm, attn2 in blocks 0 and 1, patch 1, out_channels != in_channels
    "sd35": dict(sample_size=4, patch_size=1, in_channels=4, num_layers=3, attention_head_dim=8,
                 num_attention_heads=3, joint_attention_dim=8, caption_projection_dim=24,
                 pooled_projection_dim=6, out_channels=6, pos_embed_max_size=7,
                 dual_attention_layers=(0, 1), qk_norm="rms_norm", latent=(5, 5), text=4),
    # non-square 8x12 latent (4x6 patches) off-centre in an 8x8 grid; out_channels defaults to in
    "wide": dict(sample_size=16, patch_size=2, in_channels=3, num_layers=2, attention_head_dim=4,
                 num_attention_heads=4, joint_attention_dim=10, caption_projection_dim=16,
                 pooled_projection_dim=5, out_channels=None, pos_embed_max_size=8,
                 dual_attention_layers=(0,), qk_norm="rms_norm", latent=(8, 12), text=3),
}
EXTRA = ("latent", "text")


def _model_config(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in EXTRA}


def _torch_sd3(cfg: dict):
    torch = torch_module()
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**_model_config(cfg)).eval()
    with torch.no_grad():  # random everything, so a zero bias or unit norm cannot hide a mapping bug
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs(cfg: dict, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, w = cfg["latent"]
    out = {
        "hidden_states": rng.normal(size=(batch, h, w, cfg["in_channels"])),  # NHWC
        "encoder_hidden_states": rng.normal(size=(batch, cfg["text"], cfg["joint_attention_dim"])),
        "pooled_projections": rng.normal(size=(batch, cfg["pooled_projection_dim"])),
        "timestep": rng.uniform(0, 1000, size=(batch,)),
    }
    return {k: v.astype(np.float32) for k, v in out.items()}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(config, torch model, jdpt model loaded from the torch model's saved folder)."""
    cfg = CONFIGS[request.param]
    ref = _torch_sd3(cfg)
    folder = tmp_path_factory.mktemp(f"sd3_{request.param}")
    ref.save_pretrained(folder)
    return cfg, ref, jdpt.from_diffusers(folder)


def _torch_forward(ref, inputs, **extra) -> np.ndarray:
    import torch

    args = {k: torch.from_numpy(v) for k, v in inputs.items()}
    args["hidden_states"] = args["hidden_states"].permute(0, 3, 1, 2)
    return ref(**args, **extra).sample.permute(0, 2, 3, 1).numpy()  # back to NHWC


@functools.partial(jax.jit, static_argnames="skip_layers")
def _forward(model, inputs, plans=None, residuals=None, skip_layers=None):
    return model(**inputs, plans=plans, block_controlnet_hidden_states=residuals, skip_layers=skip_layers)


def test_forward_matches_diffusers(pair):
    cfg, ref, ours = pair
    inputs = _inputs(cfg)
    out = _forward(ours, inputs)
    assert out.shape == (2, *cfg["latent"], cfg["out_channels"] or cfg["in_channels"])
    assert_parity(out, _torch_forward(ref, inputs))


def _residuals(cfg: dict, seed: int) -> list[np.ndarray]:
    """``num_layers - 1`` controlnet residuals ``[B, S_img, inner_dim]``."""
    rng = np.random.default_rng(seed)
    h, w = (n // cfg["patch_size"] for n in cfg["latent"])
    shape = (2, h * w, cfg["num_attention_heads"] * cfg["attention_head_dim"])
    return [rng.normal(size=shape).astype(np.float32) for _ in range(max(1, cfg["num_layers"] - 1))]


def test_controlnet_residuals_match_diffusers(pair):
    """Residuals follow diffusers' interval rule (sd3: 4 residuals over 5 blocks -> 0, 0, 1, 2,
    none; Flux's ``i // ceil(5 / 4)`` would give 0, 0, 1, 1)."""
    torch = torch_module()
    cfg, ref, ours = pair
    inputs, residuals = _inputs(cfg, seed=1), _residuals(cfg, seed=2)
    out = _forward(ours, inputs, residuals=residuals)
    assert np.abs(out - _forward(ours, inputs)).max() > 1e-2
    expected = _torch_forward(ref, inputs, block_controlnet_hidden_states=[torch.from_numpy(r) for r in residuals])
    assert_parity(out, expected, what="controlnet residuals")


@pytest.mark.parametrize("pair", ["sd3"], indirect=True)
def test_skip_layers_match_diffusers(pair):
    """Skipped blocks do not run but still take their controlnet residual."""
    torch = torch_module()
    cfg, ref, ours = pair
    inputs, residuals = _inputs(cfg, seed=3), _residuals(cfg, seed=4)
    out = _forward(ours, inputs, residuals=residuals, skip_layers=(1,))
    assert np.abs(out - _forward(ours, inputs, residuals=residuals)).max() > 1e-2
    expected = _torch_forward(ref, inputs, block_controlnet_hidden_states=[torch.from_numpy(r) for r in residuals],
                              skip_layers=[1])
    assert_parity(out, expected, what="skip_layers")


def test_to_diffusers_round_trip(pair, tmp_path):
    """jdpt -> to_diffusers -> diffusers from_pretrained gives the same outputs."""
    from diffusers import SD3Transformer2DModel

    cfg, ref, ours = pair
    jdpt.weights.to_diffusers(ours, tmp_path)
    back = SD3Transformer2DModel.from_pretrained(tmp_path).eval()
    assert SD3Config.from_dict(dict(back.config)) == ours.config
    inputs = _inputs(cfg, seed=5)
    np.testing.assert_array_equal(_torch_forward(back, inputs), _torch_forward(ref, inputs))


def test_attention_layer_names():
    model = nnx.eval_shape(lambda: SD3Transformer(SD3Config(**_model_config(CONFIGS["sd35"])), rngs=nnx.Rngs(0)))
    assert attention_layer_names(model) == [
        "transformer_blocks.0.attn",
        "transformer_blocks.0.attn2",
        "transformer_blocks.1.attn",
        "transformer_blocks.1.attn2",
        "transformer_blocks.2.attn",
    ]


@pytest.mark.parametrize("pair", ["sd35"], indirect=True)
def test_head_perturbation_plans(pair):
    """u = 0 is plain attention; u = 1 (PAG) on a joint or an image-only layer changes the output
    and, at the layer, makes every token's attention output its own value (image and text)."""
    cfg, _, ours = pair
    inputs = _inputs(cfg, seed=6)
    names = attention_layer_names(ours)
    heads = cfg["num_attention_heads"]
    base = np.asarray(_forward(ours, inputs))

    def weights(perturbed: str | None) -> LayerPlans:  # one pytree structure: compiled once
        u = {n: jnp.full(heads, float(n == perturbed)) for n in names}
        return LayerPlans(layers={n: AttentionPlan(head_weight=u[n]) for n in names})

    np.testing.assert_allclose(_forward(ours, inputs, weights(None)), base, atol=1e-5)
    for layer in [n for n in names if n.startswith("transformer_blocks.0.")]:
        assert np.abs(_forward(ours, inputs, weights(layer)) - base).max() > 1e-3, layer

    block = ours.transformer_blocks[0]
    dim = heads * cfg["attention_head_dim"]
    rng = np.random.default_rng(7)
    x, c = rng.normal(size=(2, 6, dim)).astype(np.float32), rng.normal(size=(2, 3, dim)).astype(np.float32)
    identity = AttentionPlan(head_weight=jnp.ones(heads))
    out_x, out_c = block.attn(x, c, identity)
    np.testing.assert_allclose(out_x, block.attn.to_out[0](block.attn.to_v(x)), atol=1e-5)
    np.testing.assert_allclose(out_c, block.attn.to_add_out(block.attn.add_v_proj(c)), atol=1e-5)
    np.testing.assert_allclose(block.attn2(x, None, identity), block.attn2.to_out[0](block.attn2.to_v(x)), atol=1e-5)

    # The joint sequence is [image, text]: the sown map equals one computed in that order by hand.
    _, probs = nnx.capture(block.attn, nnx.Intermediate)(x, c, AttentionPlan(return_probs=True))
    (probs,) = jax.tree.leaves(probs)
    a = block.attn
    q = jnp.concatenate([a.norm_q(a._heads(a.to_q(x))), a.norm_added_q(a._heads(a.add_q_proj(c)))], axis=1)
    k = jnp.concatenate([a.norm_k(a._heads(a.to_k(x))), a.norm_added_k(a._heads(a.add_k_proj(c)))], axis=1)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(cfg["attention_head_dim"])
    assert probs.shape == (2, 9, 9)
    np.testing.assert_allclose(probs, jax.nn.softmax(logits, -1).mean(1), atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    cfg = CONFIGS["wide"]
    model = nnx.eval_shape(lambda: SD3Transformer(SD3Config(**_model_config(cfg)), rngs=nnx.Rngs(0)))
    good = _inputs(cfg)

    def call(residuals=None, skip_layers=None, **changes):
        jax.eval_shape(lambda m, i: m(**i, block_controlnet_hidden_states=residuals, skip_layers=skip_layers),
                       model, {**good, **changes})

    call()  # the good inputs pass
    x = good["hidden_states"]
    cases = [
        (dict(hidden_states=x.transpose(0, 3, 1, 2)), r"in_channels=3\]; got shape \(2, 3, 8, 12\)\. Transpose"),
        (dict(hidden_states=x[:, :7]), r"multiples of patch_size=2; got 7x12"),
        (dict(hidden_states=np.zeros((2, 8, 18, 3), np.float32)), r"4x9 patch grid, larger than pos_embed_max_size=8"),
        (dict(encoder_hidden_states=good["encoder_hidden_states"][..., :4]),
         r"joint_attention_dim=10\]; got \(2, 3, 4\)"),
        (dict(pooled_projections=good["pooled_projections"][:, :3]), r"pooled_projection_dim=5\]; got \(2, 3\)"),
        (dict(residuals=[np.zeros((2, 24, 8), np.float32)]), r"\[2, 24, 16\] residuals; got shapes \[\(2, 24, 8\)\]"),
        (dict(residuals=[]), r"non-empty list"),
        (dict(skip_layers=(2,)), r"indices \[2\] outside \[0, num_layers=2\)"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            call(**changes)


def test_bad_configs_raise_clear_errors():
    base = _model_config(CONFIGS["wide"])
    cases = [
        (dict(qk_norm="layer_norm"), r"qk_norm='layer_norm' is not supported"),
        (dict(caption_projection_dim=12), r"caption_projection_dim=12 must equal .* = 16"),
        (dict(num_attention_heads=3, attention_head_dim=2, caption_projection_dim=6), r"= 6 must be a multiple of 4"),
        (dict(pos_embed_max_size=None), r"pos_embed_max_size=None"),
        (dict(dual_attention_layers=(0, 5)), r"indices \[5\] outside \[0, num_layers=2\)"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            SD3Config(**{**base, **changes}).validate()
    with pytest.raises(ValueError, match="qk_norm='l2'"):
        SD3Config.from_dict({**base, "qk_norm": "l2"})

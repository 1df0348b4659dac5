"""FluxTransformer vs diffusers FluxTransformer2DModel on small random configs (fp32, CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdpt
from jdpt.models.flux import FluxConfig, FluxTransformer
from jdpt.models.attention import AttentionPlan, attention_layer_names, plan_layers
from tests.reference import assert_parity, to_numpy, torch_module

CONFIGS = {
    # guidance-distilled (FLUX.1-dev-like), non-square 3x4 token grid
    "dev": dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12,
                guidance_embeds=True, axes_dims_rope=(4, 6, 6), grid=(3, 4), text=5),
    # schnell-like: no guidance embedding, out_channels != in_channels, 4 heads of 8
    "schnell": dict(in_channels=12, out_channels=8, num_layers=1, num_single_layers=3,
                    attention_head_dim=8, num_attention_heads=4, joint_attention_dim=16,
                    pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(2, 2, 4),
                    grid=(5, 2), text=7),
    # only double-stream blocks, 3 heads of 24, wider RoPE axes
    "double_only": dict(in_channels=8, num_layers=3, num_single_layers=0, attention_head_dim=24,
                        num_attention_heads=3, joint_attention_dim=8, pooled_projection_dim=6,
                        guidance_embeds=True, axes_dims_rope=(8, 8, 8), grid=(2, 6), text=3),
}


def _torch_flux(cfg: dict):
    torch = torch_module()
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model_cfg = {k: v for k, v in cfg.items() if k not in ("grid", "text")}
    model = FluxTransformer2DModel(**model_cfg).eval()
    with torch.no_grad():  # random everything, so a zero bias cannot hide a mapping bug
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs(cfg: dict, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, w = cfg["grid"]
    n_txt = cfg["text"]
    grid = np.stack(np.meshgrid(np.zeros(1), np.arange(h), np.arange(w), indexing="ij"), -1)
    ids = grid.reshape(-1, 3).astype(np.float32)
    out = {
        "hidden_states": rng.normal(size=(batch, h * w, cfg["in_channels"])),
        "encoder_hidden_states": rng.normal(size=(batch, n_txt, cfg["joint_attention_dim"])),
        "pooled_projections": rng.normal(size=(batch, cfg["pooled_projection_dim"])),
        "timestep": rng.uniform(size=(batch,)),
        "img_ids": ids,
        "txt_ids": rng.integers(0, 4, size=(n_txt, 3)).astype(np.float32),
    }
    if cfg["guidance_embeds"]:
        out["guidance"] = rng.uniform(1, 5, size=(batch,))
    return {k: v.astype(np.float32) for k, v in out.items()}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(config, torch model, jdpt model loaded from the torch model's saved folder)."""
    cfg = CONFIGS[request.param]
    ref = _torch_flux(cfg)
    folder = tmp_path_factory.mktemp(f"flux_{request.param}")
    ref.save_pretrained(folder)
    return cfg, ref, jdpt.from_diffusers(folder)


def _torch_forward(ref, inputs, **extra):
    import torch

    args = {k: torch.from_numpy(v) for k, v in inputs.items()}
    return ref(**args, **extra).sample


@jax.jit
def _forward(model, inputs, plans=None):
    return model(**inputs, plans=plans)


def test_forward_matches_diffusers(pair):
    cfg, ref, ours = pair
    inputs = _inputs(cfg)
    assert_parity(_forward(ours, inputs), _torch_forward(ref, inputs))


def test_input_gradients_match_diffusers(pair):
    torch = torch_module()
    cfg, ref, ours = pair
    inputs = _inputs(cfg, seed=1)
    names = ("hidden_states", "encoder_hidden_states", "pooled_projections")
    weight = np.random.default_rng(2).normal(size=_forward(ours, inputs).shape).astype(np.float32)

    def loss(diff, rest):
        return jnp.sum(ours(**diff, **rest) * weight)

    grads = jax.jit(jax.grad(loss))({k: inputs[k] for k in names}, {k: v for k, v in inputs.items() if k not in names})
    with torch.enable_grad():
        targs = {k: torch.from_numpy(v).requires_grad_(k in names) for k, v in inputs.items()}
        (ref(**targs).sample * torch.from_numpy(weight)).sum().backward()
    for k in names:
        assert_parity(grads[k], targs[k].grad, rtol=1e-3, what=f"d loss / d {k}")


def test_controlnet_residuals_match_diffusers(pair):
    torch = torch_module()
    cfg, ref, ours = pair
    inputs = _inputs(cfg, seed=3)
    rng = np.random.default_rng(4)
    shape = (2, int(np.prod(cfg["grid"])), cfg["num_attention_heads"] * cfg["attention_head_dim"])
    # Two residuals (fewer than the blocks: the interval rule) or one per block, never more.
    double = [rng.normal(size=shape).astype(np.float32) for _ in range(min(2, cfg["num_layers"]))]
    single = [rng.normal(size=shape).astype(np.float32)] if cfg["num_single_layers"] else None
    for repeat in (False, True):
        ours_out = jax.jit(ours.__call__, static_argnames="controlnet_blocks_repeat")(
            **inputs, controlnet_block_samples=double, controlnet_single_block_samples=single,
            controlnet_blocks_repeat=repeat)
        ref_out = _torch_forward(
            ref, inputs,
            controlnet_block_samples=[torch.from_numpy(d) for d in double],
            controlnet_single_block_samples=None if single is None else [torch.from_numpy(s) for s in single],
            controlnet_blocks_repeat=repeat,
        )
        assert_parity(ours_out, ref_out, what=f"controlnet residuals (repeat={repeat})")


def test_bf16_close_to_fp32(pair, tmp_path):
    cfg, ref, ours = pair
    ref.save_pretrained(tmp_path)
    ours16 = jdpt.from_diffusers(tmp_path, dtype=jnp.bfloat16)
    params = jax.tree.leaves(nnx.state(ours16, nnx.Param))
    assert all(p.dtype == jnp.bfloat16 for p in params)
    inputs = _inputs(cfg, seed=5)
    out32 = np.asarray(_forward(ours, inputs))
    # Activations bf16; timesteps and guidance scales stay fp32 as a sampler passes them.
    half = {k: v if k in ("timestep", "guidance") else jnp.asarray(v, jnp.bfloat16) for k, v in inputs.items()}
    out16 = _forward(ours16, half)
    assert out16.dtype == jnp.bfloat16
    # bf16 keeps 8 mantissa bits; measured 6e-3..9e-3 of the output scale on these configs.
    err = np.abs(to_numpy(out16) - out32).max() / np.abs(out32).max()
    assert err < 3e-2, f"bf16 relative error {err:.3e}"


def test_head_perturbation_plans(pair):
    """u = 0 is plain attention; u = 1 on a layer is PAG's identity attention (out = V)."""
    cfg, _, ours = pair
    inputs = _inputs(cfg, seed=6)
    names = attention_layer_names(ours)
    assert names == sorted(names) and len(names) == cfg["num_layers"] + cfg["num_single_layers"]
    assert "transformer_blocks.0.attn" in names
    base = np.asarray(_forward(ours, inputs))
    h = cfg["num_attention_heads"]
    zero = plan_layers(names, r".*", AttentionPlan(head_weight=jnp.zeros(h)))
    np.testing.assert_allclose(_forward(ours, inputs, zero), base, atol=1e-5)
    pag = plan_layers(names, r"transformer_blocks\.0\.attn", AttentionPlan(head_weight=jnp.ones(h)))
    perturbed = np.asarray(_forward(ours, inputs, pag))
    assert np.abs(perturbed - base).max() > 1e-3

    # u = 1 means each token's attention output is its own value vector: check at the layer.
    attn = ours.transformer_blocks[0].attn
    rng = np.random.default_rng(7)
    dim = h * cfg["attention_head_dim"]
    x, c = rng.normal(size=(1, 4, dim)).astype(np.float32), rng.normal(size=(1, 3, dim)).astype(np.float32)
    ids = jnp.asarray(rng.integers(0, 3, size=(7, 3)).astype(np.float32))
    rope = jdpt.models.embeddings.rope_frequencies(ids, cfg["axes_dims_rope"], 10000.0)
    out_x, out_c = attn(x, c, rope, AttentionPlan(head_weight=jnp.ones(h)))
    np.testing.assert_allclose(out_x, attn.to_out[0](attn.to_v(x)), atol=1e-5)
    np.testing.assert_allclose(out_c, attn.to_add_out(attn.add_v_proj(c)), atol=1e-5)


def test_attention_probabilities_are_sown(pair):
    cfg, _, ours = pair
    inputs = _inputs(cfg, seed=8)
    names = attention_layer_names(ours)
    plans = plan_layers(names, r"transformer_blocks\.0\.attn", AttentionPlan(return_probs=True))

    @jax.jit
    def run(model, inputs):
        return nnx.capture(model, nnx.Intermediate)(**inputs, plans=plans)

    _, captured = run(ours, inputs)
    (probs,) = jax.tree.leaves(captured)
    n = int(np.prod(cfg["grid"])) + cfg["text"]
    assert probs.shape == (2, n, n)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_to_diffusers_round_trip(pair, tmp_path):
    """jdpt -> to_diffusers -> diffusers from_pretrained gives the same outputs."""
    from diffusers import FluxTransformer2DModel

    cfg, ref, ours = pair
    jdpt.weights.to_diffusers(ours, tmp_path)
    back = FluxTransformer2DModel.from_pretrained(tmp_path).eval()
    inputs = _inputs(cfg, seed=9)
    expected = _torch_forward(ref, inputs)
    np.testing.assert_array_equal(_torch_forward(back, inputs).numpy(), expected.numpy())


def test_latent_packing_matches_diffusers():
    torch = torch_module()
    from diffusers import FluxPipeline

    from jdpt.models.flux import image_ids, pack_latents, unpack_latents

    latents = np.random.default_rng(0).normal(size=(2, 6, 10, 4)).astype(np.float32)  # NHWC
    ref = FluxPipeline._pack_latents(torch.from_numpy(latents.transpose(0, 3, 1, 2)), 2, 4, 6, 10)
    np.testing.assert_array_equal(pack_latents(latents), ref.numpy())
    np.testing.assert_array_equal(unpack_latents(pack_latents(latents), 6, 10), latents)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    np.testing.assert_array_equal(image_ids(6, 10), ids.numpy())
    with pytest.raises(ValueError, match="must be even; got 5x10"):
        pack_latents(latents[:, :5])


def test_bad_inputs_raise_clear_errors():
    cfg = CONFIGS["dev"]
    model = nnx.eval_shape(lambda: FluxTransformer(FluxConfig(**{k: v for k, v in cfg.items()
                                                                 if k not in ("grid", "text")}),
                                                   rngs=nnx.Rngs(0)))
    good = _inputs(cfg)

    def call(**changes):
        jax.eval_shape(lambda m, i: m(**i), model, {**good, **changes})

    call()  # the good inputs pass
    cases = [
        (dict(hidden_states=good["hidden_states"][..., :8]), r"in_channels=16\]; got shape \(2, 12, 8\)"),
        (dict(hidden_states=np.zeros((2, 3, 4, 16), np.float32)), r"got shape \(2, 3, 4, 16\). Pack"),
        (dict(encoder_hidden_states=good["encoder_hidden_states"][..., :3]), r"joint_attention_dim=24\]"),
        (dict(pooled_projections=good["pooled_projections"][:1]), r"pooled_projection_dim=12\]"),
        (dict(img_ids=good["img_ids"][:5]), r"img_ids must be \[12, 3\]"),
        (dict(txt_ids=np.zeros((1, 5, 3), np.float32)), r"txt_ids must be \[5, 3\].*no batch axis"),
        (dict(guidance=None), r"guidance_embeds=True\): pass guidance"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            call(**changes)
    with pytest.raises(ValueError, match=r"guidance_embeds=False\): pass guidance=None"):
        schnell = CONFIGS["schnell"]
        m = nnx.eval_shape(lambda: FluxTransformer(FluxConfig(**{k: v for k, v in schnell.items()
                                                                 if k not in ("grid", "text")}),
                                                   rngs=nnx.Rngs(0)))
        jax.eval_shape(lambda m, i: m(**i), m, {**_inputs(schnell), "guidance": np.ones(2, np.float32)})

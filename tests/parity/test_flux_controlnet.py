"""FluxControlNetModel vs diffusers, and ControlNet residuals on FluxTransformer (fp32, CPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdpt
from jdpt.models.attention import attention_layer_names
from jdpt.models.flux import FluxConfig, FluxTransformer
from jdpt.models.flux_controlnet import FluxControlNetConfig, FluxControlNetModel
from jdpt.weights import state_dict
from tests.parity.test_flux import _inputs
from tests.reference import assert_parity, torch_module

DEV = dict(in_channels=16, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
           pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
CONFIGS = {
    # guidance-distilled, double and single blocks (InstantX-like)
    "dev": dict(DEV, num_layers=2, num_single_layers=2, grid=(3, 4), text=5),
    # ControlNet-Union: no single blocks, 3 control modes, no guidance embedding
    "union": dict(in_channels=12, num_layers=3, num_single_layers=0, attention_head_dim=8,
                  num_attention_heads=4, joint_attention_dim=16, pooled_projection_dim=8,
                  guidance_embeds=False, axes_dims_rope=(2, 2, 4), num_mode=3, grid=(5, 2), text=7),
}
# The base transformer the "dev" ControlNet drives: 3 double and 3 single blocks, so 2 residuals
# per stream exercise the interval rule (0, 0, 1) and repetition (0, 1, 0).
TRANSFORMER = dict(DEV, num_layers=3, num_single_layers=3)
NOT_MODEL = ("grid", "text")


def _randomised(model):
    import torch

    torch.manual_seed(0)
    with torch.no_grad():  # every parameter random, zero layers included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _saved_and_loaded(ref, folder):
    ref.save_pretrained(folder)
    return jdpt.from_diffusers(folder)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def controlnet(request, tmp_path_factory):
    """(config, diffusers ControlNet, ours loaded from its save_pretrained folder)."""
    torch_module()
    from diffusers import FluxControlNetModel as TorchControlNet

    cfg = CONFIGS[request.param]
    ref = _randomised(TorchControlNet(**{k: v for k, v in cfg.items() if k not in NOT_MODEL}))
    return cfg, ref, _saved_and_loaded(ref, tmp_path_factory.mktemp(f"cn_{request.param}"))


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    torch_module()
    from diffusers import FluxTransformer2DModel

    ref = _randomised(FluxTransformer2DModel(**TRANSFORMER))
    return ref, _saved_and_loaded(ref, tmp_path_factory.mktemp("flux"))


def _cn_inputs(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    inputs = _inputs(cfg, seed=seed)
    rng = np.random.default_rng(seed + 100)
    inputs["controlnet_cond"] = rng.normal(size=inputs["hidden_states"].shape).astype(np.float32)
    if cfg.get("num_mode"):
        inputs["controlnet_mode"] = np.array([[2], [0]], np.int64)
    return inputs


def _torch_controlnet(ref, inputs, scale):
    import torch

    return ref(**{k: torch.from_numpy(v) for k, v in inputs.items()}, conditioning_scale=scale,
               return_dict=False)


@jax.jit
def _controlnet(model, inputs, scale):
    return model(**inputs, conditioning_scale=scale)


@functools.partial(jax.jit, static_argnames="repeat")
def _transformer(model, inputs, samples, repeat: bool = False):
    double, single = samples
    return model(**inputs, controlnet_block_samples=double, controlnet_single_block_samples=single,
                 controlnet_blocks_repeat=repeat)


def test_controlnet_matches_diffusers(controlnet):
    cfg, ref, ours = controlnet
    inputs = _cn_inputs(cfg, seed=0)
    double, single = _controlnet(ours, inputs, 0.7)
    ref_double, ref_single = _torch_controlnet(ref, inputs, 0.7)
    names = [f"transformer_blocks.{i}.attn" for i in range(cfg["num_layers"])]
    names += [f"single_transformer_blocks.{i}.attn" for i in range(cfg["num_single_layers"])]
    assert attention_layer_names(ours) == sorted(names)
    assert len(double) == len(ref_double) == cfg["num_layers"]
    for i, (a, b) in enumerate(zip(double, ref_double)):
        assert_parity(a, b, what=f"controlnet_block_samples[{i}]")
    if cfg["num_single_layers"]:
        assert len(single) == len(ref_single) == cfg["num_single_layers"]
        for i, (a, b) in enumerate(zip(single, ref_single)):
            assert_parity(a, b, what=f"controlnet_single_block_samples[{i}]")
    else:
        assert single is None and ref_single is None
    if cfg.get("num_mode"):  # the mode token matters
        other = _controlnet(ours, {**inputs, "controlnet_mode": np.array([[1], [1]])}, 0.7)[0][-1]
        assert np.abs(np.asarray(other) - np.asarray(double[-1])).max() > 1e-3


def test_transformer_with_controlnet_matches_diffusers(transformer, tmp_path):
    import torch
    from diffusers import FluxControlNetModel as TorchControlNet

    ref_flux, flux = transformer
    cfg = CONFIGS["dev"]
    ref_cn = _randomised(TorchControlNet(**{k: v for k, v in cfg.items() if k not in NOT_MODEL}))
    cn = _saved_and_loaded(ref_cn, tmp_path)
    inputs = _cn_inputs(cfg, seed=1)
    base = {k: v for k, v in inputs.items() if k != "controlnet_cond"}
    samples, ref_samples = _controlnet(cn, inputs, 0.6), _torch_controlnet(ref_cn, inputs, 0.6)
    outputs = []
    for repeat in (False, True):
        ours = _transformer(flux, base, samples, repeat)
        ref = ref_flux(**{k: torch.from_numpy(v) for k, v in base.items()},
                       controlnet_block_samples=ref_samples[0],
                       controlnet_single_block_samples=ref_samples[1],
                       controlnet_blocks_repeat=repeat).sample
        assert_parity(ours, ref, what=f"transformer + controlnet (repeat={repeat})")
        outputs.append(np.asarray(ours))
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-2  # the residuals matter, and so does the rule


def test_controlnet_at_initialisation_leaves_base_bit_identical(transformer):
    _, flux = transformer
    cn = FluxControlNetModel.from_transformer(flux, num_layers=2, num_single_layers=2, rngs=nnx.Rngs(0))
    inputs = _cn_inputs(CONFIGS["dev"], seed=2)
    base = {k: v for k, v in inputs.items() if k != "controlnet_cond"}
    double, single = _controlnet(cn, inputs, 1.0)
    assert all(not np.any(np.asarray(s)) for s in (*double, *single))
    # Eager calls: two jitted programs (with and without the additions) may fuse differently and
    # differ in the last bit even though every residual is exactly zero.
    with_zeros = flux(**base, controlnet_block_samples=double, controlnet_single_block_samples=single)
    np.testing.assert_array_equal(with_zeros, flux(**base))

    # ... and training can start: the zero layers get non-zero gradients.
    weight = np.random.default_rng(3).normal(size=(2, 12, 32)).astype(np.float32)
    zero_layers = nnx.Any(nnx.PathContains("controlnet_blocks"), nnx.PathContains("controlnet_single_blocks"))

    @jax.jit
    def grads(cn):
        def loss(cn):
            double, single = cn(**inputs)
            return sum(jnp.sum(s * weight) for s in (*double, *single))
        return nnx.grad(loss, argnums=nnx.DiffState(0, zero_layers))(cn)

    g = grads(cn)
    for layer in (*g["controlnet_blocks"].values(), *g["controlnet_single_blocks"].values()):
        assert np.abs(np.asarray(layer["kernel"][...])).max() > 1e-3


def test_from_transformer_copies_diffusers(transformer):
    from diffusers import FluxControlNetModel as TorchControlNet

    ref_flux, flux = transformer
    ref = TorchControlNet.from_transformer(ref_flux, num_layers=2, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2)
    ours = FluxControlNetModel.from_transformer(flux, num_layers=2, num_single_layers=1, rngs=nnx.Rngs(0))
    ours_config = ours.config.to_dict()
    assert ours_config.pop("_class_name") == "FluxControlNetModel"
    assert ours_config == {k: list(v) if isinstance(v, tuple) else v for k, v in ref.config.items()
                           if not k.startswith("_")}
    ours_sd = state_dict(ours)
    ref_sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert sorted(ours_sd) == sorted(ref_sd)
    copied = ("time_text_embed.", "context_embedder.", "x_embedder.", "transformer_blocks.",
              "single_transformer_blocks.")
    n_copied = 0
    for key, value in ours_sd.items():
        if key.startswith(copied):
            np.testing.assert_array_equal(value, ref_sd[key], err_msg=key)
            n_copied += 1
        else:  # controlnet_x_embedder, controlnet_blocks, controlnet_single_blocks
            assert not np.any(value) and not np.any(ref_sd[key]), key
    assert n_copied > 0.9 * len(ours_sd)

    # More blocks than the transformer has: the first ones are copies (as diffusers' strict=False).
    longer = FluxControlNetModel.from_transformer(flux, num_layers=4, num_single_layers=1, rngs=nnx.Rngs(0))
    def kernel(model, i):
        return np.asarray(model.transformer_blocks[i].attn.to_q.kernel[...])

    np.testing.assert_array_equal(kernel(longer, 2), kernel(flux, 2))
    assert len(longer.transformer_blocks) == 4
    fresh = FluxControlNetModel.from_transformer(flux, num_layers=2, num_single_layers=1,
                                                 load_weights_from_transformer=False, rngs=nnx.Rngs(0))
    assert not np.array_equal(kernel(fresh, 0), kernel(flux, 0))
    assert not np.array_equal(fresh.x_embedder.kernel[...], flux.x_embedder.kernel[...])


def test_to_diffusers_round_trip(controlnet, tmp_path):
    from diffusers import FluxControlNetModel as TorchControlNet

    cfg, ref, ours = controlnet
    jdpt.weights.to_diffusers(ours, tmp_path)
    back = TorchControlNet.from_pretrained(tmp_path).eval()
    inputs = _cn_inputs(cfg, seed=4)
    back_out, ref_out = (_torch_controlnet(m, inputs, 0.5) for m in (back, ref))
    assert (back_out[1] is None) == (ref_out[1] is None)
    for a, b in zip([*back_out[0], *(back_out[1] or ())], [*ref_out[0], *(ref_out[1] or ())]):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _abstract(cls, config):
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))


def test_bad_inputs_raise_clear_errors():
    dev = {k: v for k, v in CONFIGS["dev"].items() if k not in NOT_MODEL}
    cn = _abstract(FluxControlNetModel, FluxControlNetConfig(**dev))
    union = _abstract(FluxControlNetModel, FluxControlNetConfig(
        **{k: v for k, v in CONFIGS["union"].items() if k not in NOT_MODEL}))
    flux = _abstract(FluxTransformer, FluxConfig(**TRANSFORMER))
    good, good_union = _cn_inputs(CONFIGS["dev"], seed=5), _cn_inputs(CONFIGS["union"], seed=5)

    def run(model, inputs, **kw):
        return jax.eval_shape(lambda m, i: m(**i, **kw), model, inputs)

    run(cn, good)
    run(union, good_union)
    with pytest.raises(ValueError, match=r"controlnet_cond has shape \(2, 6, 16\); it must match hidden_states"):
        run(cn, {**good, "controlnet_cond": good["controlnet_cond"][:, :6]})
    with pytest.raises(ValueError, match=r"num_mode=3\) needs controlnet_mode: \[B\] or \[B, 1\].*got None"):
        run(union, {k: v for k, v in good_union.items() if k != "controlnet_mode"})
    with pytest.raises(ValueError, match=r"num_mode=None\): pass controlnet_mode=None"):
        run(cn, {**good, "controlnet_mode": np.zeros((2, 1), np.int32)})

    base = {k: v for k, v in good.items() if k != "controlnet_cond"}
    sample = np.zeros((2, 12, 32), np.float32)
    run(flux, base, controlnet_block_samples=[sample] * 3, controlnet_single_block_samples=[sample])
    cases = [
        (dict(controlnet_block_samples=[sample] * 4), r"block_samples holds 4 residuals for 3 blocks"),
        (dict(controlnet_single_block_samples=[]), r"holds 0 residuals for 3 blocks; pass at least one"),
        (dict(controlnet_block_samples=[sample, sample[..., :16]]),
         r"controlnet_block_samples\[1\] has shape \(2, 12, 16\).*\[2, 12, 32\]"),
        (dict(controlnet_single_block_samples=[sample[:1]]), r"single_block_samples\[0\] has shape \(1, 12, 32\)"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            run(flux, base, **kw)

    with pytest.raises(ValueError, match=r"conditioning_embedding_channels=16: the pixel-space"):
        FluxControlNetConfig(**dev, conditioning_embedding_channels=16).validate()
    with pytest.raises(ValueError, match=r"num_mode=0: a ControlNet-Union needs at least one mode"):
        FluxControlNetConfig(**dev, num_mode=0).validate()
    with pytest.raises(ValueError, match=r"num_attention_heads=4, attention_head_dim=8 differ.*2 x 16"):
        FluxControlNetModel.from_transformer(flux, num_attention_heads=4, attention_head_dim=8, rngs=nnx.Rngs(0))

"""UNet2DConditionModel vs diffusers UNet2DConditionModel on small random configs (fp32, CPU).

Torch runs NCHW, jdpt NHWC: inputs and outputs are transposed for the comparison. Compilation
dominates on the CPU, so each config is compiled once: one jitted function returns the plain
output and, for some configs, the output with ControlNet residuals or under a PAG plan.
"""

from __future__ import annotations

import copy
import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdpt
from jdpt.models.attention import AttentionPlan, attention_layer_names, plan_layers
from jdpt.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from tests.reference import assert_parity, to_numpy, torch_module

CONFIGS = {
    # SD 1.5-like: conv proj_in/proj_out, 2 cross-attention down blocks + 1 plain, 4 heads everywhere
    "sd15": dict(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=24, attention_head_dim=4, latent=(8, 8), text=7),
    # SDXL-like: linear projections, text_time added embedding, per-block heads and depths
    "sdxl": dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 cross_attention_dim=24, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8, latent=(8, 8), text=5),
    # non-square latent, per-block resnet counts, centred input, other time embedding and norms
    "wide": dict(block_out_channels=(16, 32), layers_per_block=(1, 2), norm_num_groups=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), in_channels=3, out_channels=5,
                 cross_attention_dim=12, attention_head_dim=2, center_input_sample=True,
                 flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1.5, norm_eps=1e-6,
                 act_fn="gelu", latent=(16, 24), text=3),
}
BATCH = 2
TEXT_EMBEDS = 16
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # compile time halves, numerics unchanged


def _model_kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("latent", "text")}


def _torch_unet(cfg: dict):
    torch = torch_module()
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(0)
    model = TorchUNet(**_model_kwargs(cfg)).eval()
    with torch.no_grad():  # random everything, so a zero bias or a unit norm cannot hide a bug
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _nchw(x) -> np.ndarray:
    return np.ascontiguousarray(to_numpy(x).transpose(0, 3, 1, 2))


def _nhwc(x) -> np.ndarray:
    return np.ascontiguousarray(to_numpy(x).transpose(0, 2, 3, 1))


class _IdentitySelfAttention:
    """A diffusers attention processor computing PAG's identity attention: ``to_out(to_v(x))``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return attn.to_out[0](attn.to_v(hidden_states))


# Which configs also run with ControlNet residuals / under a PAG plan (each is one more forward
# in the config's compiled function; SDXL residuals are also checked in test_controlnet.py).
WITH_RESIDUALS = ["sd15", "wide"]
WITH_PAG = ["sdxl"]


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def _outputs(model, inputs, residuals, mid, pag):
    out = {"forward": model(**inputs)}
    if residuals is not None:
        out["residuals"] = model(**inputs, down_block_additional_residuals=residuals,
                                 mid_block_additional_residual=mid)
    if pag is not None:
        out["pag"] = model(**inputs, plans=pag)
    return out


class Case:
    """One config: the torch model, the jdpt model loaded from its folder, inputs and outputs."""

    def __init__(self, name: str, folder):
        self.name, self.cfg = name, CONFIGS[name]
        self.ref = _torch_unet(self.cfg)
        self.ref.save_pretrained(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every key diffusers writes is understood
            self.model = jdpt.from_diffusers(folder)
        config = self.model.config
        rng = np.random.default_rng(1)
        h, w = self.cfg["latent"]
        self.inputs = {
            "sample": rng.normal(size=(BATCH, h, w, config.in_channels)).astype(np.float32),
            "timestep": np.array([3.0, 801.0], np.float32),
            "encoder_hidden_states": rng.normal(size=(BATCH, self.cfg["text"], config.cross_attention_dim))
            .astype(np.float32),
        }
        if config.addition_embed_type == "text_time":
            self.inputs["added_cond_kwargs"] = {
                "text_embeds": rng.normal(size=(BATCH, TEXT_EMBEDS)).astype(np.float32),
                "time_ids": np.array([[64, 48, 0, 8, 64, 48], [32, 40, 4, 0, 32, 40]], np.float32),
            }
        shapes, mid_shape = self.model.residual_shapes(BATCH, h, w)
        self.residuals = [rng.normal(size=s).astype(np.float32) for s in shapes] if name in WITH_RESIDUALS else None
        self.mid = rng.normal(size=mid_shape).astype(np.float32)
        names = attention_layer_names(self.model)
        pag = plan_layers(names, r"mid\..*\.self", AttentionPlan(head_weight=jnp.ones(config.heads[-1])))
        pag = pag if name in WITH_PAG else None
        self.ours = {k: np.asarray(v) for k, v in
                     _outputs(self.model, self.inputs, self.residuals, self.mid, pag).items()}

    def torch_forward(self, ref, **extra) -> np.ndarray:
        import torch

        x = self.inputs
        kwargs = {}
        if "added_cond_kwargs" in x:
            kwargs["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in x["added_cond_kwargs"].items()}
        out = ref(torch.from_numpy(_nchw(x["sample"])), torch.from_numpy(x["timestep"]),
                  torch.from_numpy(x["encoder_hidden_states"]), **kwargs, **extra).sample
        return _nhwc(out)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory) -> Case:
    return Case(request.param, tmp_path_factory.mktemp(f"unet_{request.param}"))


def test_forward_matches_diffusers(case):
    h, w = case.cfg["latent"]
    assert case.ours["forward"].shape == (BATCH, h, w, case.model.config.out_channels)
    assert_parity(case.ours["forward"], case.torch_forward(case.ref), what=f"{case.name}: forward")


@pytest.mark.parametrize("case", WITH_RESIDUALS, indirect=True)
def test_controlnet_residuals_match_diffusers(case):
    import torch

    ref = case.torch_forward(
        case.ref,
        down_block_additional_residuals=tuple(torch.from_numpy(_nchw(r)) for r in case.residuals),
        mid_block_additional_residual=torch.from_numpy(_nchw(case.mid)),
    )
    assert_parity(case.ours["residuals"], ref, what=f"{case.name}: with residuals")
    assert np.abs(case.ours["residuals"] - case.ours["forward"]).max() > 1e-2  # they do matter


@pytest.mark.parametrize("case", WITH_PAG, indirect=True)
def test_pag_plan_on_mid_self_attention_matches_diffusers(case):
    """u = 1 on ``mid\\..*\\.self`` = diffusers with identity self-attention in the mid block."""
    ref = copy.deepcopy(case.ref)
    for attention in ref.mid_block.attentions:
        for block in attention.transformer_blocks:
            block.attn1.set_processor(_IdentitySelfAttention())
    assert_parity(case.ours["pag"], case.torch_forward(ref), what=f"{case.name}: PAG on mid")
    assert np.abs(case.ours["pag"] - case.ours["forward"]).max() > 1e-3


def test_round_trip_through_diffusers(case, tmp_path):
    """jdpt -> to_diffusers -> diffusers from_pretrained gives back every tensor of the original."""
    from diffusers import UNet2DConditionModel as TorchUNet

    folder = jdpt.weights.to_diffusers(case.model, tmp_path)
    back, ref = TorchUNet.from_pretrained(folder).state_dict(), case.ref.state_dict()
    assert sorted(back) == sorted(ref)
    for key, value in ref.items():
        np.testing.assert_array_equal(back[key].numpy(), value.numpy(), err_msg=key)


@functools.cache
def _abstract_unet(name: str, param_dtype=jnp.float32) -> UNet2DConditionModel:
    """A model of ``ShapeDtypeStruct`` leaves (no memory, no compile): enough to trace."""
    config = UNet2DConditionConfig(**_model_kwargs(CONFIGS[name]))
    return nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0), param_dtype=param_dtype))


def test_attention_layer_names():
    """Down block 1 has 2 attentions of depth 2 (j = 0..3), the mid block 1 of depth 2, up block 0
    3 attentions of depth 2 (j = 0..5); DownBlock2D/UpBlock2D have none."""
    model = _abstract_unet("sdxl")
    names = attention_layer_names(model)
    blocks = ([f"down.1.attn.{j}" for j in range(4)] + [f"mid.attn.{j}" for j in range(2)]
              + [f"up.0.attn.{j}" for j in range(6)])
    assert names == [
        "down.1.attn.0.self", "down.1.attn.0.cross", "down.1.attn.1.self", "down.1.attn.1.cross",
        "down.1.attn.2.self", "down.1.attn.2.cross", "down.1.attn.3.self", "down.1.attn.3.cross",
        "mid.attn.0.self", "mid.attn.0.cross", "mid.attn.1.self", "mid.attn.1.cross",
        "up.0.attn.0.self", "up.0.attn.0.cross", "up.0.attn.1.self", "up.0.attn.1.cross",
        "up.0.attn.2.self", "up.0.attn.2.cross", "up.0.attn.3.self", "up.0.attn.3.cross",
        "up.0.attn.4.self", "up.0.attn.4.cross", "up.0.attn.5.self", "up.0.attn.5.cross",
    ]
    assert names == [f"{b}.{kind}" for b in blocks for kind in ("self", "cross")]
    layer = model.up_blocks[0].attentions[2].transformer_blocks[1]
    assert (layer.attn1.layer_name, layer.attn2.layer_name) == ("up.0.attn.5.self", "up.0.attn.5.cross")


def test_attention_probabilities_are_sown():
    """A ``return_probs`` plan reaches the named layer: self maps are [B, hw, hw], cross [B, hw, L]."""
    model = _abstract_unet("sd15")
    names = attention_layer_names(model)
    plans = plan_layers(names, r"down\.1\.attn\.0\.(self|cross)", AttentionPlan(return_probs=True))
    inputs = {"sample": jnp.zeros((BATCH, 8, 8, 4)), "timestep": jnp.zeros(BATCH),
              "encoder_hidden_states": jnp.zeros((BATCH, 7, 24))}
    _, sown = jax.eval_shape(lambda m: nnx.capture(m, nnx.Intermediate)(**inputs, plans=plans), model)
    shapes = {".".join(map(str, p)): v.get_value()[0].shape for p, v in nnx.to_flat_state(sown)}
    prefix = "down_blocks.1.attentions.0.transformer_blocks.0"
    assert shapes == {f"{prefix}.attn1.attn_probs": (BATCH, 16, 16), f"{prefix}.attn2.attn_probs": (BATCH, 16, 7)}


def test_bf16_params_give_bf16_activations():
    """With bf16 weights and inputs every conv and projection runs in bf16; only the attention
    logits (fp32 by design) do not."""
    model = _abstract_unet("sdxl", param_dtype=jnp.bfloat16)
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    bf16 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.bfloat16)
    args = (bf16((1, 8, 8, 4)), jax.ShapeDtypeStruct((1,), jnp.float32), bf16((1, 5, 24)),
            {"text_embeds": bf16((1, 16)), "time_ids": jax.ShapeDtypeStruct((1, 6), jnp.float32)})

    def run(m, x, t, c, added):
        return m(x, t, c, added_cond_kwargs=added)

    jaxpr = str(jax.make_jaxpr(run)(model, *args))
    convs = re.findall(r"(\w+)\[[\d,]*\] = conv_general_dilated", jaxpr)
    dots = re.findall(r"(\w+)\[[\d,]*\] = dot_general", jaxpr)
    n_attention = len(attention_layer_names(model))
    assert len(convs) > 20 and set(convs) == {"bf16"}
    assert dots.count("f32") == n_attention and set(dots) == {"bf16", "f32"}
    assert jax.eval_shape(run, model, *args).dtype == jnp.bfloat16


def test_bad_inputs_raise_clear_errors():
    sdxl, sd15 = _abstract_unet("sdxl"), _abstract_unet("sd15")
    x, c = np.zeros((BATCH, 8, 8, 4), np.float32), np.zeros((BATCH, 5, 24), np.float32)
    t = np.zeros(BATCH, np.float32)
    added = {"text_embeds": np.zeros((BATCH, 16), np.float32), "time_ids": np.zeros((BATCH, 6), np.float32)}

    def call(model, sample=x, timestep=t, context=c, **kwargs):
        jax.eval_shape(lambda m: m(sample, timestep, context, **kwargs), model)

    call(sdxl, added_cond_kwargs=added)  # the good inputs pass
    call(sd15)
    cases = [
        (dict(sample=np.zeros((BATCH, 4, 8, 8))), r"NHWC \[B, H, W, in_channels=4\]; got shape \(2, 4, 8, 8\)\. "
                                                  r"It looks NCHW"),
        (dict(sample=np.zeros((BATCH, 8, 8, 3))), r"in_channels=4\]; got shape \(2, 8, 8, 3\)\.(?! It looks)"),
        (dict(sample=np.zeros((BATCH, 8, 7, 4))), r"8x7 is not divisible by the UNet's downsampling factor 2 "
                                                  r".*\(e\.g\. to 8x8\)"),
        (dict(timestep=np.zeros((BATCH, 1))), r"timestep must be a scalar or \[B=2\]; got shape \(2, 1\)"),
        (dict(context=np.zeros((BATCH, 5, 16))), r"cross_attention_dim=24\]; got \(2, 5, 16\)"),
        (dict(context=np.zeros((1, 5, 24))), r"encoder_hidden_states must be \[B=2, L"),
        (dict(added_cond_kwargs=None), r"needs added_cond_kwargs=\{'text_embeds': \[B, E\], 'time_ids': \[B, 6\]\}; got keys None"),
        (dict(added_cond_kwargs={"text_embeds": added["text_embeds"]}), r"got keys \['text_embeds'\]"),
        (dict(added_cond_kwargs={**added, "text_embeds": np.zeros((BATCH, 20))}),
         r"embed to width 20 \+ 6 \* addition_time_embed_dim=8 = 68, but .*=64; pass 16-wide text_embeds"),
        (dict(added_cond_kwargs={**added, "time_ids": np.zeros((1, 6))}), r"\[B=2, N\]; got \(2, 16\) and \(1, 6\)"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            call(sdxl, **{"added_cond_kwargs": added, **changes})
    with pytest.raises(ValueError, match=r"added_cond_kwargs \['text_embeds', 'time_ids'\] given to a model "
                                         r"without an added embedding"):
        call(sd15, added_cond_kwargs=added)


def test_bad_residuals_raise_clear_errors():
    model = _abstract_unet("sd15")
    x, c, t = np.zeros((BATCH, 8, 8, 4), np.float32), np.zeros((BATCH, 7, 24), np.float32), np.zeros(BATCH)
    shapes, mid_shape = model.residual_shapes(BATCH, 8, 8)
    assert shapes == [(2, 8, 8, 32)] * 2 + [(2, 4, 4, 32)] * 2 + [(2, 2, 2, 32), (2, 2, 2, 64)]
    assert mid_shape == (2, 2, 2, 64)
    down = [np.zeros(s, np.float32) for s in shapes]
    mid = np.zeros(mid_shape, np.float32)

    def call(down, mid):
        jax.eval_shape(lambda m: m(x, t, c, down_block_additional_residuals=down,
                                   mid_block_additional_residual=mid), model)

    call(down, mid)
    call([d[:, :1, :1] for d in down], mid[:, :1, :1])  # globally pooled residuals broadcast
    with pytest.raises(ValueError, match=r"has 5 arrays; this UNet has 6 skip states"):
        call(down[:-1], mid)
    with pytest.raises(ValueError, match=r"down_block_additional_residuals\[3\] must be \(2, 4, 4, 32\) .*got "
                                         r"\(2, 8, 8, 32\)"):
        call(down[:3] + [down[0]] + down[4:], mid)
    with pytest.raises(ValueError, match=r"mid_block_additional_residual must be \(2, 2, 2, 64\)"):
        call(down, mid[..., :32])
    with pytest.raises(ValueError, match="come in pairs.*got only the down one"):
        call(down, None)


def test_bad_configs_raise_clear_errors():
    base = _model_kwargs(CONFIGS["sd15"])
    cases = [
        (dict(attention_head_dim=(4, 4)), r"attention_head_dim=\(4, 4\) must be a positive int or a tuple of 3"),
        (dict(transformer_layers_per_block=(1, 0, 1)), r"transformer_layers_per_block=\(1, 0, 1\)"),
        (dict(down_block_types=("CrossAttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D")),
         r"down_block_types .* must give one of \('CrossAttnDownBlock2D', 'DownBlock2D'\)"),
        (dict(up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")), r"up_block_types .* for each of the 3"),
        (dict(mid_block_type="UNetMidBlock2D"), r"mid_block_type='UNetMidBlock2D' is not supported"),
        (dict(class_embed_type="timestep"), r"class_embed_type='timestep' is not supported .* only "
                                            r"class_embed_type=None"),
        (dict(num_attention_heads=4), r"num_attention_heads=4: diffusers' UNet2DConditionModel rejects it.* "
                                       r"attention_head_dim=4 and num_attention_heads=None"),
        (dict(time_cond_proj_dim=8), r"time_cond_proj_dim=8 is not supported"),
        (dict(only_cross_attention=(False, True, False)), r"only_cross_attention=\(False, True, False\)"),
        (dict(norm_num_groups=6), r"multiples of norm_num_groups=6 \(bad: \[32, 32, 64\]\)"),
        (dict(attention_head_dim=3), r"divide into the attention heads .*\[\(32, 3\), \(32, 3\), \(64, 3\)\]"),
        (dict(addition_embed_type="text_time"), r"needs addition_time_embed_dim and "
                                                r"projection_class_embeddings_input_dim"),
        (dict(addition_embed_type="text"), r"addition_embed_type='text' is not supported"),
        (dict(act_fn="mish"), r"act_fn='mish' is not supported"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            UNet2DConditionConfig(**{**base, **changes}).validate()
    with pytest.raises(ValueError, match=r"class_embed_type='timestep' is not supported"):
        UNet2DConditionConfig.from_dict({**base, "class_embed_type": "timestep"})

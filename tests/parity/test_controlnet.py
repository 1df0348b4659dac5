"""ControlNetModel vs diffusers ControlNetModel on small random configs (fp32, CPU), its residuals
driving the UNet, and ``from_unet`` (a copied encoder, zero residuals)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx

import jdpt
from jdpt.models.controlnet import ControlNetConfig, ControlNetModel
from tests.parity.test_unet import CONFIGS as UNET_CONFIGS
from tests.parity.test_unet import FAST_COMPILE, _model_kwargs, _nchw, _nhwc, _torch_unet
from tests.reference import assert_parity, torch_module

_UNET_ONLY = ("up_block_types", "out_channels", "center_input_sample")
CONFIGS = {
    # SD 1.5-like UNet; a "shuffle"-style ControlNet (globally pooled residuals), 2x condition encoder
    "sd15": dict(unet="sd15", conditioning_embedding_out_channels=(8, 16), global_pool_conditions=True,
                 scale=0.5, guess_mode=False),
    # SDXL-like UNet (text_time); 4x condition encoder, guess mode
    "sdxl": dict(unet="sdxl", conditioning_embedding_out_channels=(4, 8, 16), global_pool_conditions=False,
                 scale=0.8, guess_mode=True),
}
BATCH = 2


def _controlnet_kwargs(cfg: dict) -> dict:
    unet = _model_kwargs(UNET_CONFIGS[cfg["unet"]])
    return {**{k: v for k, v in unet.items() if k not in _UNET_ONLY},
            "conditioning_embedding_out_channels": cfg["conditioning_embedding_out_channels"],
            "global_pool_conditions": cfg["global_pool_conditions"]}


def _torch_controlnet(cfg: dict):
    torch = torch_module()
    from diffusers import ControlNetModel as TorchControlNet

    torch.manual_seed(1)
    model = TorchControlNet(**_controlnet_kwargs(cfg)).eval()
    with torch.no_grad():  # random everything: the zero convs too, or they would hide every bug
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@functools.partial(jax.jit, static_argnames="guess_mode", compiler_options=FAST_COMPILE)
def _controlnet(model, inputs, cond, scale=1.0, guess_mode=False):
    return model(**inputs, controlnet_cond=cond, conditioning_scale=scale, guess_mode=guess_mode)


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def _unet(model, inputs, down, mid):
    return model(**inputs, down_block_additional_residuals=down, mid_block_additional_residual=mid)


class Case:
    """A torch UNet and ControlNet, their jdpt loads, inputs, and both models' outputs."""

    def __init__(self, name: str, folder):
        import torch

        self.name, self.cfg = name, CONFIGS[name]
        unet_cfg = UNET_CONFIGS[self.cfg["unet"]]
        self.ref_unet, self.ref = _torch_unet(unet_cfg), _torch_controlnet(self.cfg)
        self.ref_unet.save_pretrained(folder / "unet")
        self.ref.save_pretrained(folder / "controlnet")
        self.unet = jdpt.from_diffusers(folder / "unet")
        self.model = jdpt.from_diffusers(folder / "controlnet")
        config = self.model.config
        rng = np.random.default_rng(2)
        h, w = unet_cfg["latent"]
        f = config.conditioning_factor
        self.inputs = {
            "sample": rng.normal(size=(BATCH, h, w, config.in_channels)).astype(np.float32),
            "timestep": np.array([999.0, 40.0], np.float32),
            "encoder_hidden_states": rng.normal(size=(BATCH, 6, config.cross_attention_dim)).astype(np.float32),
        }
        if config.addition_embed_type == "text_time":
            self.inputs["added_cond_kwargs"] = {
                "text_embeds": rng.normal(size=(BATCH, 16)).astype(np.float32),
                "time_ids": np.array([[32, 32, 0, 0, 32, 32], [64, 16, 8, 2, 64, 16]], np.float32),
            }
        self.cond = rng.uniform(size=(BATCH, h * f, w * f, config.conditioning_channels)).astype(np.float32)
        self.down, self.mid = _controlnet(self.model, self.inputs, self.cond, self.cfg["scale"],
                                          guess_mode=self.cfg["guess_mode"])
        self.torch_down, self.torch_mid = self.ref(
            *self.torch_args(), controlnet_cond=torch.from_numpy(_nchw(self.cond)),
            conditioning_scale=self.cfg["scale"], guess_mode=self.cfg["guess_mode"], return_dict=False,
            **self.torch_kwargs())

    def torch_args(self) -> list:
        import torch

        x = self.inputs
        return [torch.from_numpy(_nchw(x["sample"])), torch.from_numpy(x["timestep"]),
                torch.from_numpy(x["encoder_hidden_states"])]

    def torch_kwargs(self) -> dict:
        import torch

        added = self.inputs.get("added_cond_kwargs")
        return {} if added is None else {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in added.items()}}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """``cases(name)``: the :class:`Case` of config ``name``, made once per module."""
    made = {}

    def get(name: str) -> Case:
        if name not in made:
            made[name] = Case(name, tmp_path_factory.mktemp(f"controlnet_{name}"))
        return made[name]

    return get


@pytest.fixture(params=sorted(CONFIGS))
def case(request, cases) -> Case:
    return cases(request.param)


@pytest.fixture(scope="module")
def fresh(cases):
    """(SDXL-like case, a ControlNet made by ``from_unet`` from the case's jdpt UNet)."""
    case = cases("sdxl")
    return case, ControlNetModel.from_unet(case.unet, conditioning_embedding_out_channels=(4, 8, 16),
                                          rngs=nnx.Rngs(3))


def test_forward_matches_diffusers(case):
    down, mid = case.torch_down, case.torch_mid
    h, w = UNET_CONFIGS[case.cfg["unet"]]["latent"]
    shapes, mid_shape = case.model.residual_shapes(BATCH, h, w)
    if case.cfg["global_pool_conditions"]:
        shapes, mid_shape = [(s[0], 1, 1, s[3]) for s in shapes], (BATCH, 1, 1, mid_shape[3])
    assert [d.shape for d in case.down] == shapes and case.mid.shape == mid_shape
    assert len(down) == len(case.down)
    for i, (ours, ref) in enumerate(zip(case.down, down)):
        assert_parity(ours, _nhwc(ref), what=f"{case.name}: down residual {i}")
    assert_parity(case.mid, _nhwc(mid), what=f"{case.name}: mid residual")


def test_residuals_drive_the_unet_like_diffusers(case):
    """Our ControlNet's residuals in our UNet == diffusers' residuals in diffusers' UNet."""
    assert max(float(np.abs(r).max()) for r in (*case.down, case.mid)) > 1e-2  # they matter
    ref = case.ref_unet(*case.torch_args(), **case.torch_kwargs(), down_block_additional_residuals=case.torch_down,
                        mid_block_additional_residual=case.torch_mid).sample
    ours = _unet(case.unet, case.inputs, case.down, case.mid)
    assert_parity(ours, _nhwc(ref), what=f"{case.name}: UNet with ControlNet residuals")


def test_from_unet_copies_the_encoder(fresh):
    """Every copied leaf equals the UNet's, the zero convs are zero, and the state dict has the keys
    and (except the randomly initialised condition encoder) the values of diffusers' from_unet."""
    from diffusers import ControlNetModel as TorchControlNet

    case, controlnet = fresh
    for name in ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block"):
        ours = nnx.to_flat_state(nnx.state(getattr(controlnet, name), nnx.Param))
        unet = dict(nnx.to_flat_state(nnx.state(getattr(case.unet, name), nnx.Param)))
        assert len(ours) == len(unet) > 0
        for path, value in ours:
            np.testing.assert_array_equal(value.get_value(), unet[path].get_value(), err_msg=f"{name} {path}")

    ref_model = TorchControlNet.from_unet(case.ref_unet, conditioning_embedding_out_channels=(4, 8, 16))
    assert ControlNetConfig.from_dict(ref_model.config) == controlnet.config
    ref, ours = ref_model.state_dict(), jdpt.weights.state_dict(controlnet)
    assert sorted(ours) == sorted(ref)
    zero = [k for k in ours if k.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                             "controlnet_cond_embedding.conv_out"))]
    assert len(zero) == 2 * (len(controlnet.controlnet_down_blocks) + 2)
    for key, value in ours.items():
        if key in zero:
            assert not value.any(), key
        if not key.startswith("controlnet_cond_embedding"):
            np.testing.assert_array_equal(value, ref[key].numpy(), err_msg=key)


def test_fresh_controlnet_leaves_the_unet_output_bit_identical(fresh):
    case, controlnet = fresh
    # the case's scale and guess mode: the same compiled function as for the loaded ControlNet
    down, mid = _controlnet(controlnet, case.inputs, case.cond, case.cfg["scale"],
                            guess_mode=case.cfg["guess_mode"])
    assert all(not np.asarray(r).any() for r in (*down, mid))
    with_residuals = np.asarray(_unet(case.unet, case.inputs, down, mid))
    np.testing.assert_array_equal(with_residuals, np.asarray(_unet(case.unet, case.inputs, None, None)))


def _abstract_controlnet(name: str) -> ControlNetModel:
    config = ControlNetConfig(**_controlnet_kwargs(CONFIGS[name]))
    return nnx.eval_shape(lambda: ControlNetModel(config, rngs=nnx.Rngs(0)))


def test_bad_inputs_raise_clear_errors():
    model = _abstract_controlnet("sd15")  # condition encoder factor 2
    x, t, c = np.zeros((BATCH, 8, 8, 4), np.float32), np.zeros(BATCH), np.zeros((BATCH, 7, 24), np.float32)

    def call(cond):
        jax.eval_shape(lambda m: m(x, t, c, cond), model)

    call(np.zeros((BATCH, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"controlnet_cond must be \[B, H \* 2, W \* 2, conditioning_channels=3\] "
                                         r"= \(2, 16, 16, 3\) for a 8x8 sample .*got \(2, 64, 64, 3\)\. "
                                         r"Resize the control image to 16x16"):
        call(np.zeros((BATCH, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"got \(2, 3, 16, 16\)"):
        call(np.zeros((BATCH, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"got \(2, 16, 16, 1\)"):
        call(np.zeros((BATCH, 16, 16, 1), np.float32))
    with pytest.raises(ValueError, match=r"sample must be NHWC \[B, H, W, in_channels=4\]"):
        jax.eval_shape(lambda m: m(x[..., :3], t, c, np.zeros((BATCH, 16, 16, 3))), model)


def test_bad_configs_raise_clear_errors():
    base = _controlnet_kwargs(CONFIGS["sd15"])
    cases = [
        (dict(layers_per_block=(1, 2, 1)), r"layers_per_block=\(1, 2, 1\): diffusers' ControlNetModel takes one int"),
        (dict(controlnet_conditioning_channel_order="bgr"), r"controlnet_conditioning_channel_order='bgr' is not "
                                                            r"supported"),
        (dict(conditioning_embedding_out_channels=()), r"conditioning_embedding_out_channels=\(\) must hold"),
        (dict(num_attention_heads=3), r"\[\(32, 3\), \(32, 3\), \(64, 3\)\]; heads come from num_attention_heads=3"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            ControlNetConfig(**{**base, **changes}).validate()
    ControlNetConfig(**{**base, "num_attention_heads": 8}).validate()  # allowed here, unlike in the UNet

"""Every alignment objective on the real model families through their adapters (jdpt.models.adapters):
tiny random Flux (guidance-distilled), SD3 and SDXL (text_time) configs, with their real
conditioning (text embeddings, pooled embeddings, the guidance value, SDXL time ids) and VAE
latents (a tiny random AutoencoderKL). Each method trains a few steps on 1 and on 8 simulated
devices with the same numbers (max error 1e-4 of the largest value), and its loss falls when it
trains on one fixed batch. Online methods run through jdpt.train.online.make_online_step with the
VAE in the frozen extras and a host reward on the decoded images; reward backprop differentiates a
reward on the decoded images. Flow-only methods (Flow-GRPO, DiffusionNFT) refuse an eps-prediction
UNet with an error that says why."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jdpt.diffusion.schedules import DDPMSchedule
from jdpt.models.adapters import FluxAdapter, SD3Adapter, UNetAdapter
from jdpt.models.flux import FluxConfig, FluxTransformer
from jdpt.models.lora import add_lora
from jdpt.models.sd3 import SD3Config, SD3Transformer
from jdpt.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from jdpt.models.vae import AutoencoderKL, AutoencoderKLConfig
from jdpt.objectives import DDPO, DPO, DPOK, NFT, SFT, AlignProp, FlowGRPO, ForwardProcess, MaPO
from jdpt.objectives.ddpo import flow_as_epsilon
from jdpt.parallel import make_mesh, make_train_step
from jdpt.train.online import make_online_step
from tests.objectives.test_ddpo import _fast_compiles

__all__ = ["_fast_compiles"]  # the module-scoped fixture (XLA's optimisation passes off) applies here too

P, G = 4, 2  # online: prompts per step x samples per prompt = 8 rows, one per simulated device
B = 8
STEPS = 3
LATENT = (8, 8)
SCHEDULE = DDPMSchedule.stable_diffusion()
# Plain SGD on clipped gradients: the parameters of the 1- and 8-device runs then differ by the
# gradients' rounding, where Adam's normalised first steps would blow a near-zero gradient's
# rounding up to a full step.
OPTIMIZER = optax.sgd(0.1)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    build: object  # () -> model
    adapter: object
    cond: object  # (rng, n) -> cond dict
    vae: AutoencoderKLConfig
    lora: tuple[str, ...]

    @property
    def flow(self) -> bool:
        return self.adapter.prediction == "velocity"


def _vae(scaling: float, shift: float | None) -> AutoencoderKLConfig:
    return AutoencoderKLConfig(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                               block_out_channels=(8, 8), norm_num_groups=4, latent_channels=4, sample_size=16,
                               scaling_factor=scaling, shift_factor=shift, mid_block_add_attention=False)


def _normal(rng, *shape):
    return rng.normal(size=shape).astype(np.float32)


FAMILIES = {
    "flux": Family(
        "flux", lambda: FluxTransformer(FluxConfig(in_channels=16, num_layers=1, num_single_layers=1,
                                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                                   pooled_projection_dim=12, guidance_embeds=True,
                                                   axes_dims_rope=(4, 6, 6)), rngs=nnx.Rngs(0)),
        FluxAdapter(LATENT),
        lambda rng, n: {"prompt_embeds": _normal(rng, n, 5, 24), "pooled_prompt_embeds": _normal(rng, n, 12),
                        "guidance": np.full((n,), 3.5, np.float32)},
        _vae(0.3611, 0.1159), (r"attn\.to_[qkv]", r"attn\.add_[qkv]_proj")),
    "sd3": Family(
        "sd3", lambda: SD3Transformer(SD3Config(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                                caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
                                                pos_embed_max_size=8), rngs=nnx.Rngs(0)),
        SD3Adapter(LATENT),
        lambda rng, n: {"prompt_embeds": _normal(rng, n, 5, 12), "pooled_prompt_embeds": _normal(rng, n, 10)},
        _vae(1.5305, 0.0609), (r"attn\.to_[qkv]", r"attn\.add_[qkv]_proj")),
    "sdxl": Family(
        "sdxl", lambda: UNet2DConditionModel(UNet2DConditionConfig(
            block_out_channels=(16,), layers_per_block=1, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
            cross_attention_dim=24, attention_head_dim=2, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
            sample_size=8), rngs=nnx.Rngs(0)),
        UNetAdapter(LATENT),
        lambda rng, n: {"prompt_embeds": _normal(rng, n, 5, 24), "pooled_prompt_embeds": _normal(rng, n, 16),
                        "time_ids": np.tile(np.array([16, 16, 0, 0, 16, 16], np.float32), (n, 1))},
        _vae(0.13025, None), (r"attn[12]\.to_[qkv]",)),
}


def _process(family: Family, timesteps: str = "uniform") -> ForwardProcess:
    return ForwardProcess(timesteps=timesteps) if family.flow else ForwardProcess.ddpm(SCHEDULE)


def _eps(family: Family):
    """The family's adapter in the DDPM convention (DDPO / DPOK on flow models: flow_as_epsilon)."""
    return flow_as_epsilon(family.adapter, SCHEDULE) if family.flow else family.adapter


def brightness(images, prompts):
    """A host reward: mean brightness of uint8 images in [0, 1]."""
    return np.asarray(images, np.float64).mean(axis=(1, 2, 3)) / 255


def objective(method: str, family: Family, vae):
    """Each method with small-model settings: few sampler steps, PPO's usual clip range of 0.2
    (the papers' 1e-4 stops a fixed batch's surrogate after one step), CFG 1."""
    a = family.adapter
    if method == "sft":
        return SFT(a, _process(family, "logit_normal"))
    if method == "dpo":
        return DPO(a, beta=50.0, process=_process(family))
    if method == "mapo":
        return MaPO(a, process=_process(family))
    if method == "nft":
        return NFT(a, num_steps=3, shift=3.0)
    if method == "flow_grpo":
        return FlowGRPO(a, num_steps=3, cfg_scale=1.0, clip_range=0.2, beta=0.04)
    if method == "ddpo":
        return DDPO(_eps(family), SCHEDULE, num_steps=3, cfg_scale=1.0, clip_range=0.2)
    if method == "dpok":
        return DPOK(_eps(family), SCHEDULE, num_steps=3, cfg_scale=1.0, clip_range=0.2, baseline="batch")
    if method == "alignprop":
        def reward(x0, cond):  # mean brightness of the decoded images, differentiable
            return jnp.mean(a.images(vae, x0).astype(jnp.float32), axis=(1, 2, 3))

        return AlignProp(a, reward, num_steps=3, cfg_scale=1.0, schedule=None if family.flow else SCHEDULE,
                         shift=3.0, truncation_range=(0, 3))
    raise ValueError(method)


OFFLINE = ("sft", "dpo", "mapo")
ONLINE = ("nft", "flow_grpo", "ddpo", "dpok")
METHODS = (*OFFLINE, *ONLINE, "alignprop")
# Every (family, method) pair costs two compiles (1 and 8 devices), 10-20 s on 2 CPU cores: the
# default suite runs each method on one family, each family with two or three methods; the whole
# matrix is marked slow (pytest -m slow).
DEFAULT = {("flux", "sft"), ("flux", "nft"), ("flux", "ddpo"), ("sd3", "dpo"), ("sd3", "flow_grpo"),
           ("sd3", "alignprop"), ("sdxl", "mapo"), ("sdxl", "dpok"), ("sdxl", "nft")}
CASES = [pytest.param(f, m, marks=() if (f, m) in DEFAULT else pytest.mark.slow, id=f"{f}-{m}")
         for f in sorted(FAMILIES) for m in METHODS]


@pytest.fixture(scope="module")
def family(request):
    f = FAMILIES[request.param]
    vae = AutoencoderKL(f.vae, rngs=nnx.Rngs(1))
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2 * B, 16, 16, 3)), jnp.float32)
    x0 = np.asarray(jax.jit(f.adapter.latents)(vae, images))
    return f, vae, x0


def _model(f: Family):
    model = f.build()
    add_lora(model, list(f.lora), rank=2, rngs=nnx.Rngs(2))
    return model


def _batch(method: str, f: Family, x0: np.ndarray, model, vae) -> dict:
    rng = np.random.default_rng(1)
    if method == "sft":
        return {"x0": x0[:B], "cond": f.cond(rng, B)}
    if method in ("dpo", "mapo"):
        return {"x0_w": x0[:B], "x0_l": x0[B:], "cond": f.cond(rng, B)}
    if method == "alignprop":
        return {"noise": _normal(rng, B, *f.adapter.latent_shape(model)), "cond": f.cond(rng, B)}
    return {"cond": f.cond(rng, P), "prompt": np.asarray([f"prompt {i}" for i in range(P)])}


def _steps(method: str, f: Family, model, vae, mesh):
    """``(init_state, step, update)`` of ``method`` on ``mesh`` (the VAE in ``frozen.extra``)."""
    obj = objective(method, f, vae)
    init, update = make_train_step(obj, OPTIMIZER, mesh, model=model, trainable="lora", clip_norm=1.0)
    step = update
    if method in ONLINE:
        vae_graph = nnx.graphdef(vae)
        step = make_online_step(obj, update, reward=brightness, group_size=G,
                                decode=lambda m, frozen, x0: f.adapter.images(nnx.merge(vae_graph, frozen.extra["vae"]), x0),
                                latent_shape=f.adapter.latent_shape(model))
    return (lambda: init(model, extra={"vae": nnx.state(vae)})), step, update


def _run(method, f, x0, vae, mesh, falls: bool = False):
    """``STEPS`` steps with one key (the data: one fixed batch; online: a rollout per step) ->
    ``(losses, trained adapters, fixed-batch losses)``. ``falls``: also train the same compiled
    update on one fixed batch (online: one rollout's trajectories) and return its losses."""
    model = _model(f)
    init, step, update = _steps(method, f, model, vae, mesh)
    state, losses, key = init(), [], jax.random.key(7)
    batch = _batch(method, f, x0, model, vae)
    for _ in range(STEPS):
        state, metrics = step(state, batch, key)
        losses.append(float(metrics["loss"]))
    params, fixed = jax.device_get(state.params), losses
    if falls and method in ONLINE:
        state, trajectories, key, _ = step.prepare(state, batch, key)
        if method == "nft":  # its old policy follows the params: on a batch of positive advantages
            trajectories = {**trajectories, "advantage": jnp.abs(trajectories["advantage"]) + 1}  # the loss falls
        fixed = []
        for _ in range(STEPS):
            state, metrics = update(state, trajectories, key)
            fixed.append(float(metrics["loss"]))
    return losses, params, fixed


def _close(got, want, tol=1e-4):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max()), np.abs(a - b).max()


@pytest.mark.parametrize("family, method", CASES, indirect=["family"])
def test_one_and_eight_devices_agree_and_the_loss_falls(family, method):
    f, vae, x0 = family
    if method in ("nft", "flow_grpo") and not f.flow:
        with pytest.raises(ValueError, match="treats the model's output as 'velocity' but UNetAdapter predicts 'epsilon'"):
            objective(method, f, vae)
        return
    losses, params, fixed = _run(method, f, x0, vae, make_mesh(devices=jax.devices()[:1]), falls=True)
    eight_losses, eight_params, _ = _run(method, f, x0, vae, make_mesh(data=8))
    assert all(np.isfinite(losses)), losses
    _close(eight_losses, losses)  # every step's loss
    _close(eight_params, params)  # the trained adapters
    assert fixed[-1] < fixed[0], fixed  # the loss falls on one fixed batch


@pytest.mark.parametrize("family", sorted(FAMILIES), indirect=True)
def test_adapters_check_their_inputs(family):
    f, vae, x0 = family
    model = f.build()
    with pytest.raises(ValueError, match=r"cond needs .*prompt_embeds.*lacks"):
        f.adapter(model, jnp.asarray(x0[:2]), jnp.zeros((2,)), {"input_ids": np.zeros((2, 3), np.int32)})
    other = FAMILIES["sd3" if f.name != "sd3" else "flux"].build()
    with pytest.raises(ValueError, match="adapter runs a"):
        f.adapter(other, jnp.asarray(x0[:2]), jnp.zeros((2,)), f.cond(np.random.default_rng(0), 2))
    # latents and images are inverse maps up to the VAE: shapes as the adapter says
    assert x0.shape[1:] == f.adapter.latent_shape(model)
    assert f.adapter.images(vae, jnp.asarray(x0[:1])).shape == (1, 16, 16, 3)

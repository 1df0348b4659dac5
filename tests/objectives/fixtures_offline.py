"""Tiny models and batches shared by the offline-objective tests (SFT, DPO, MaPO, NFT)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jdpt.models.lora import add_lora
from jdpt.parallel import make_mesh, make_train_step
from jdpt.world.model import WorldConfig, WorldModel

# 32 px scenes, 4 px blocks -> 16 tokens of 192 channels; one double-stream block.
TINY_WORLD = WorldConfig(width=32, heads=2, text_layers=1,
                         double_layers=1, single_layers=0, pixel_factor=4)
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow square"]


def tiny_world(seed: int = 0, lora: bool = False) -> WorldModel:
    model = WorldModel(TINY_WORLD, rngs=nnx.Rngs(seed))
    if lora:
        add_lora(model, [r"attn\.to_[qv]", r"ff\.net\.2"], rank=2, rngs=nnx.Rngs(seed + 1))
    return model


def token_shape(model: WorldModel) -> tuple[int, int]:
    h, w = model.latent_size
    return h * w // 4, model.config.flux_config().in_channels


def world_cond(model: WorldModel, n: int) -> dict:
    return {"input_ids": model.tokenize([PROMPTS[i % len(PROMPTS)] for i in range(n)])}


def random_latents(seed: int, n: int, model: WorldModel) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, *token_shape(model))).astype(np.float32)


def train_two_steps(objective, model: WorldModel, batch: dict, *, trainable: str, extra=None) -> list[dict]:
    """Two steps of ``make_train_step`` on one device with the same batch and key (so the second
    loss differs from the first only because the params moved); returns both metrics dicts."""
    mesh = make_mesh(devices=jax.devices()[:1])
    init, step = make_train_step(objective, optax.adam(1e-3), mesh, model=model, trainable=trainable)
    state = init(model, extra=extra)
    history = []
    for _ in range(2):
        state, metrics = step(state, batch, jax.random.key(0))
        history.append(jax.device_get(metrics))
    return history


def trainable_copy(model: WorldModel, trainable: str) -> nnx.State:
    """A frozen copy of ``model``'s trainable variables (reference / old policy)."""
    state = nnx.state(model, nnx.LoRAParam if trainable == "lora" else nnx.Param)
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


class ToyDenoiser(nnx.Module):
    """A small differentiable denoiser ``[B, N, C] -> [B, N, C]`` conditioned on ``t`` and on
    ``cond["c"]`` ``[B, C]``; integer (DDPM) timesteps are scaled by 1/1000."""

    def __init__(self, channels: int, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.lin = nnx.Linear(channels, channels, rngs=rngs)
        self.t_proj = nnx.Param(jax.random.normal(rngs.params(), (channels,)))

    def __call__(self, x, t, c):
        t = t.astype(jnp.float32) / (1000.0 if jnp.issubdtype(t.dtype, jnp.integer) else 1.0)
        return jnp.tanh(self.lin(x)) + t[:, None, None] * self.t_proj[...] + c[:, None, :]


def toy_denoise(model: ToyDenoiser, x_t, t, cond):
    return model(x_t, t, cond["c"])


def toy_numpy(model: ToyDenoiser):
    """An independent float64 NumPy forward of ``model``: ``(x [B,N,C], t [B], c [B,C]) -> [B,N,C]``."""
    w = np.asarray(model.lin.kernel[...], np.float64)
    b = np.asarray(model.lin.bias[...], np.float64)
    proj = np.asarray(model.t_proj[...], np.float64)

    def forward(x, t, c):
        t = np.asarray(t)
        t = t / 1000.0 if np.issubdtype(t.dtype, np.integer) else t.astype(np.float64)
        return np.tanh(np.asarray(x, np.float64) @ w + b) + t[:, None, None] * proj + np.asarray(c)[:, None, :]

    return forward


def toy_frozen(model: ToyDenoiser, extra=None):
    """``(params, Frozen)`` of a toy model with every ``nnx.Param`` trainable."""
    from jdpt.parallel.step import Frozen

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return params, Frozen(graphdef, rest, extra)


def perturbed(params, seed: int, scale: float = 0.3):
    """``params`` plus Gaussian noise (a reference or old policy different from the policy)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])

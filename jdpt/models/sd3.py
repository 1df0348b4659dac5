"""Stable Diffusion 3 / 3.5 MMDiT, a Flax NNX port of diffusers' ``SD3Transformer2DModel``.

Same inputs give the same output as the diffusers module, with image-space tensors in the jdpt
layout: latents ``[B, H, W, in_channels]`` (NHWC; diffusers takes NCHW) in, velocity
``[B, H, W, out_channels]`` out. Text tokens ``[B, L, joint_attention_dim]``, pooled text
``[B, pooled_projection_dim]`` and timesteps in [0, 1000] (used as given, as in diffusers) are
as diffusers takes them.

Attention layers, addressed by plans under their diffusers module paths:

- ``transformer_blocks.{i}.attn``: joint attention over the sequence ``[image tokens, text
  tokens]`` (image first, unlike Flux), ``S_img = (H/p)(W/p)`` image tokens in row-major patch
  order followed by the ``L`` text tokens. A per-head ``head_weight`` perturbs the whole joint
  sequence (``u = 1``: every token, image and text, keeps its own value).
- ``transformer_blocks.{i}.attn2``: SD3.5's image-only self-attention, in the blocks listed in
  ``dual_attention_layers``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdpt.models.attention import AttentionPlan, LayerPlans, attention, resolve_plan, sow_probs
from jdpt.models.config import ModelConfig
from jdpt.models.feedforward import FeedForward
from jdpt.models.flux import CombinedTimestepEmbedding
from jdpt.models.layers import conv2d, dense, layer_norm, rms_norm
from jdpt.models.modulation import AdaLayerNormContinuous, AdaLayerNormZero

Plans = LayerPlans | AttentionPlan | None

QK_NORMS = (None, "rms_norm")


@dataclasses.dataclass(frozen=True)
class SD3Config(ModelConfig):
    """diffusers ``SD3Transformer2DModel`` config (defaults: SD3-medium, Esser et al. 2024,
    "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis").

    SD3.5 sets ``qk_norm="rms_norm"`` and (Medium) lists the blocks with a second image-only
    attention in ``dual_attention_layers``.
    """

    reference_class = "SD3Transformer2DModel"

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int | None = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def validate(self) -> None:
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={self.qk_norm!r} is not supported; SD3 uses None, SD3.5 'rms_norm'")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"caption_projection_dim={self.caption_projection_dim} must equal num_attention_heads * "
                f"attention_head_dim = {self.inner_dim}: text tokens enter the joint blocks at that width"
            )
        if self.inner_dim % 4:
            raise ValueError(
                f"num_attention_heads * attention_head_dim = {self.inner_dim} must be a multiple of 4 "
                "(the 2D sincos position embedding splits it into sin/cos halves per axis)"
            )
        if not self.pos_embed_max_size:
            raise ValueError(
                f"pos_embed_max_size={self.pos_embed_max_size!r}: only the cropped position embedding "
                "of SD3/SD3.5 checkpoints is supported; set the size of its grid (SD3: 96, SD3.5: 192/384)"
            )
        if self.sample_size < self.patch_size:
            raise ValueError(f"sample_size={self.sample_size} must be at least patch_size={self.patch_size}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"dual_attention_layers {self.dual_attention_layers} has indices {bad} outside "
                f"[0, num_layers={self.num_layers})"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels


def sincos_position_embedding(height: int, width: int, dim: int, *, max_size: int, base_size: int) -> np.ndarray:
    """The fixed 2D sincos embedding of a ``height x width`` patch grid, cropped from the centre
    of a ``max_size x max_size`` grid whose positions are ``arange(max_size) * base_size / max_size``
    (diffusers ``PatchEmbed.cropped_pos_embed``).

    Returns ``[height * width, dim]`` fp32 (row-major patches): the first ``dim/2`` channels encode
    the column, the last ``dim/2`` the row, each as ``[sin, cos]`` of ``dim/4`` frequencies.
    """
    pos = np.arange(max_size, dtype=np.float32) / np.float32(max_size / base_size)
    top, left = (max_size - height) // 2, (max_size - width) // 2
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def sincos(p: np.ndarray) -> np.ndarray:  # [n] -> [n, dim/2]
        angles = p.astype(np.float64)[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)

    cols = np.broadcast_to(sincos(pos[left : left + width])[None], (height, width, dim // 2))
    rows = np.broadcast_to(sincos(pos[top : top + height])[:, None], (height, width, dim // 2))
    return np.concatenate([cols, rows], axis=-1).reshape(height * width, dim).astype(np.float32)


class PatchEmbed(nnx.Module):
    """Patchify conv + cropped sincos positions: ``[B, H, W, C] -> [B, (H/p)(W/p), D]``.

    The position table is a fixed function of the grid, computed here; diffusers keeps it as the
    buffer ``pos_embed.pos_embed`` (ignored when loading).
    """

    def __init__(self, config: SD3Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        p = config.patch_size
        self.proj = conv2d(config.in_channels, config.inner_dim, p, stride=p, rngs=rngs, param_dtype=param_dtype)
        self.max_size, self.base_size = config.pos_embed_max_size, config.sample_size // p

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)
        b, h, w, d = x.shape
        pos = sincos_position_embedding(h, w, d, max_size=self.max_size, base_size=self.base_size)
        return (x.reshape(b, h * w, d) + pos).astype(x.dtype)


class AdaLayerNormZeroX(nnx.Module):
    """diffusers ``SD35AdaLayerNormZeroX``: ``AdaLayerNormZero`` plus a second (shift, scale, gate)
    for the image-only attention.

    ``__call__(x, emb) -> (x_mod, gate_msa, shift_mlp, scale_mlp, gate_mlp, x_mod2, gate_msa2)``.
    """

    def __init__(self, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.linear = dense(dim, 9 * dim, ("embed", "mlp"), rngs=rngs, param_dtype=param_dtype)
        self.norm = layer_norm(dim, eps=1e-6, affine=False, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, emb: jax.Array):
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp, shift2, scale2, gate2 = jnp.split(
            self.linear(jax.nn.silu(emb)), 9, axis=-1
        )
        h = self.norm(x)
        return (h * (1 + scale[:, None]) + shift[:, None], gate, shift_mlp, scale_mlp, gate_mlp,
                h * (1 + scale2[:, None]) + shift2[:, None], gate2)


class SD3Attention(nnx.Module):
    """diffusers ``Attention`` with ``JointAttnProcessor2_0``.

    ``joint=True``: the text stream has its own projections (``add_*_proj``) and the two attend
    jointly over ``[image, text]``; ``context_out=False`` (the last block, ``context_pre_only``)
    drops the text output projection. ``joint=False``: image-only self-attention (``attn2``).
    ``qk_norm``: per-head RMS norms on queries and keys of both streams.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, joint: bool, context_out: bool, qk_norm: bool,
                 layer_name: str, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.layer_name = layer_name
        self.heads, self.head_dim = heads, head_dim
        self.joint, self.context_out, self.qk_norm = joint, context_out, qk_norm
        inner = heads * head_dim
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.to_q = dense(dim, inner, ("embed", "heads"), **kw)
        self.to_k = dense(dim, inner, ("embed", "heads"), **kw)
        self.to_v = dense(dim, inner, ("embed", "heads"), **kw)
        self.to_out = nnx.List([dense(inner, dim, ("heads", "embed"), **kw)])
        if qk_norm:
            self.norm_q = rms_norm(head_dim, eps=1e-6, **kw)
            self.norm_k = rms_norm(head_dim, eps=1e-6, **kw)
        if joint:
            self.add_q_proj = dense(dim, inner, ("embed", "heads"), **kw)
            self.add_k_proj = dense(dim, inner, ("embed", "heads"), **kw)
            self.add_v_proj = dense(dim, inner, ("embed", "heads"), **kw)
            if qk_norm:
                self.norm_added_q = rms_norm(head_dim, eps=1e-6, **kw)
                self.norm_added_k = rms_norm(head_dim, eps=1e-6, **kw)
            if context_out:
                self.to_add_out = dense(inner, dim, ("heads", "embed"), **kw)

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.heads, self.head_dim)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, plans: Plans = None):
        """x: ``[B, S, D]`` image tokens; context: ``[B, L, D]`` text tokens (joint layers only).

        Returns ``[B, S, D]``; joint layers return ``(image [B, S, D], text [B, L, D] or None)``,
        None where ``context_out=False``.
        """
        q, k, v = (self._heads(proj(x)) for proj in (self.to_q, self.to_k, self.to_v))
        if self.qk_norm:
            q, k = self.norm_q(q), self.norm_k(k)
        if self.joint:
            cq, ck, cv = (self._heads(proj(context)) for proj in (self.add_q_proj, self.add_k_proj, self.add_v_proj))
            if self.qk_norm:
                cq, ck = self.norm_added_q(cq), self.norm_added_k(ck)
            q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((q, cq), (k, ck), (v, cv)))
        out, probs = attention(q, k, v, plan=resolve_plan(plans, self.layer_name))
        sow_probs(self, probs)
        out = out.reshape(*out.shape[:2], -1).astype(q.dtype)
        n_img = x.shape[1]
        image = self.to_out[0](out[:, :n_img])
        if not self.joint:
            return image
        return image, self.to_add_out(out[:, n_img:]) if self.context_out else None


class JointTransformerBlock(nnx.Module):
    """diffusers ``JointTransformerBlock``: image and text streams with separate weights, joint
    attention, optional SD3.5 image-only ``attn2``. With ``context_pre_only`` (the last block)
    the text stream is only read: it is normed by ``AdaLayerNormContinuous`` and not returned."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, context_pre_only: bool, dual_attention: bool,
                 qk_norm: bool, name: str, rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.context_pre_only, self.dual_attention = context_pre_only, dual_attention
        self.norm1 = AdaLayerNormZeroX(dim, **kw) if dual_attention else AdaLayerNormZero(dim, **kw)
        if context_pre_only:
            self.norm1_context = AdaLayerNormContinuous(dim, dim, eps=1e-6, affine=False, **kw)
        else:
            self.norm1_context = AdaLayerNormZero(dim, **kw)
        attn = dict(qk_norm=qk_norm, **kw)
        self.attn = SD3Attention(dim, heads, head_dim, joint=True, context_out=not context_pre_only,
                                 layer_name=f"{name}.attn", **attn)
        if dual_attention:
            self.attn2 = SD3Attention(dim, heads, head_dim, joint=False, context_out=False,
                                      layer_name=f"{name}.attn2", **attn)
        self.norm2 = layer_norm(dim, eps=1e-6, affine=False, **kw)
        self.ff = FeedForward(dim, activation_fn="gelu-approximate", **kw)
        if not context_pre_only:
            self.norm2_context = layer_norm(dim, eps=1e-6, affine=False, **kw)
            self.ff_context = FeedForward(dim, activation_fn="gelu-approximate", **kw)

    def __call__(self, x: jax.Array, context: jax.Array, temb: jax.Array, plans: Plans = None):
        """x: ``[B, S, D]``, context: ``[B, L, D]``, temb: ``[B, D]`` -> ``(context or None, x)``."""
        if self.dual_attention:
            nx, gate_msa, shift_mlp, scale_mlp, gate_mlp, nx2, gate_msa2 = self.norm1(x, temb)
        else:
            nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        if self.context_pre_only:
            nc = self.norm1_context(context, temb)
        else:
            nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(context, temb)
        attn_x, attn_c = self.attn(nx, nc, plans)

        x = x + gate_msa[:, None] * attn_x
        if self.dual_attention:
            x = x + gate_msa2[:, None] * self.attn2(nx2, None, plans)
        h = self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp[:, None] * self.ff(h)
        if self.context_pre_only:
            return None, x

        context = context + c_gate_msa[:, None] * attn_c
        h = self.norm2_context(context) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        context = context + c_gate_mlp[:, None] * self.ff_context(h)
        return context, x


class SD3Transformer(nnx.Module):
    """SD3 / SD3.5 MMDiT: patch embedding, ``num_layers`` joint blocks, adaLN output head."""

    config_class = SD3Config
    torch_ignored = (r"pos_embed\.pos_embed",)

    def __init__(self, config: SD3Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        config.validate()
        self.config = config
        dim = config.inner_dim
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.pos_embed = PatchEmbed(config, **kw)
        self.time_text_embed = CombinedTimestepEmbedding(dim, config.pooled_projection_dim, guidance=False, **kw)
        self.context_embedder = dense(config.joint_attention_dim, config.caption_projection_dim, (None, "embed"), **kw)
        self.transformer_blocks = nnx.List([
            JointTransformerBlock(
                dim, config.num_attention_heads, config.attention_head_dim,
                context_pre_only=i == config.num_layers - 1, dual_attention=i in config.dual_attention_layers,
                qk_norm=config.qk_norm is not None, name=f"transformer_blocks.{i}", **kw,
            )
            for i in range(config.num_layers)
        ])
        self.norm_out = AdaLayerNormContinuous(dim, dim, eps=1e-6, affine=False, **kw)
        self.proj_out = dense(dim, config.patch_size**2 * config.out_dim, ("embed", None), **kw)

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        pooled_projections: jax.Array,
        timestep: jax.Array,
        *,
        block_controlnet_hidden_states: Sequence[jax.Array] | None = None,
        skip_layers: Sequence[int] | None = None,
        plans: Plans = None,
    ) -> jax.Array:
        """Predict the flow velocity of a latent image.

        Args:
            hidden_states: ``[B, H, W, in_channels]`` latents (NHWC), H and W multiples of
                ``patch_size`` and at most ``patch_size * pos_embed_max_size``.
            encoder_hidden_states: ``[B, L, joint_attention_dim]`` CLIP+T5 tokens.
            pooled_projections: ``[B, pooled_projection_dim]`` pooled CLIP embeddings.
            timestep: ``[B]`` (or scalar) in [0, 1000], used as given.
            block_controlnet_hidden_states: residuals ``[B, S_img, inner_dim]`` added to the image
                stream after every block but the last; block ``i`` takes entry
                ``int(i / (num_layers / n))`` of the ``n`` given (diffusers' rule).
            skip_layers: indices of blocks to skip (static; SD3.5 skip-layer guidance).
            plans: attention plans by layer name (see module docstring and ``jdpt.models.attention``).

        Returns:
            ``[B, H, W, out_channels]``.
        """
        cfg = self.config
        self._check_inputs(hidden_states, encoder_hidden_states, pooled_projections,
                           block_controlnet_hidden_states, skip_layers)
        b, height, width, _ = hidden_states.shape
        x = self.pos_embed(hidden_states)
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (b,))
        temb = self.time_text_embed(timestep, None, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)

        skip = set(skip_layers or ())
        n_blocks = len(self.transformer_blocks)
        for i, block in enumerate(self.transformer_blocks):
            if i not in skip:
                context, x = block(x, context, temb, plans)
            if block_controlnet_hidden_states is not None and not block.context_pre_only:
                residuals = block_controlnet_hidden_states
                x = x + residuals[int(i / (n_blocks / len(residuals)))]

        x = self.proj_out(self.norm_out(x, temb))
        p = cfg.patch_size
        x = x.reshape(b, height // p, width // p, p, p, cfg.out_dim).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, height, width, cfg.out_dim)

    def _check_inputs(self, x, context, pooled, residuals, skip_layers) -> None:
        cfg = self.config
        p, max_size = cfg.patch_size, cfg.pos_embed_max_size
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"hidden_states must be NHWC latents [B, H, W, in_channels={cfg.in_channels}]; got shape "
                f"{tuple(x.shape)}. Transpose NCHW latents with x.transpose(0, 2, 3, 1)."
            )
        b, h, w, _ = x.shape
        if h % p or w % p:
            raise ValueError(f"latent height and width must be multiples of patch_size={p}; got {h}x{w}")
        if h // p > max_size or w // p > max_size:
            raise ValueError(
                f"a {h}x{w} latent is a {h // p}x{w // p} patch grid, larger than pos_embed_max_size="
                f"{max_size}: use latents of at most {p * max_size}x{p * max_size}"
            )
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(
                f"encoder_hidden_states must be [B={b}, L, joint_attention_dim={cfg.joint_attention_dim}]; "
                f"got {tuple(context.shape)}"
            )
        if pooled.shape != (b, cfg.pooled_projection_dim):
            raise ValueError(
                f"pooled_projections must be [B={b}, pooled_projection_dim={cfg.pooled_projection_dim}]; "
                f"got {tuple(pooled.shape)}"
            )
        if residuals is not None:
            want = (b, (h // p) * (w // p), cfg.inner_dim)
            shapes = [tuple(r.shape) for r in residuals]
            if not shapes or any(s != want for s in shapes):
                raise ValueError(
                    f"block_controlnet_hidden_states must be a non-empty list of [B, S_img, inner_dim] = "
                    f"{list(want)} residuals; got shapes {shapes}"
                )
        bad = [i for i in skip_layers or () if not 0 <= i < cfg.num_layers]
        if bad:
            raise ValueError(
                f"skip_layers {list(skip_layers)} has indices {bad} outside [0, num_layers={cfg.num_layers})"
            )

"""Flux transformer (Black Forest Labs), a Flax NNX port of diffusers' ``FluxTransformer2DModel``.

Same inputs in the same conventions give the same output as the diffusers module: packed latent
tokens ``[B, S_img, in_channels]``, text tokens ``[B, S_txt, joint_attention_dim]``, pooled text
``[B, pooled_projection_dim]``, timesteps in [0, 1] (scaled by 1000 inside), position ids
``[S, len(axes_dims_rope)]`` for the multi-axis RoPE.

Attention layers are named ``transformer_blocks.{i}.attn`` (double-stream, joint text+image) and
``single_transformer_blocks.{i}.attn`` (single-stream); plans address them by these names. In a
joint layer the sequence is ``[text tokens, image tokens]``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jdpt.models.attention import AttentionPlan, LayerPlans, attention, resolve_plan, sow_probs
from jdpt.models.config import ModelConfig
from jdpt.models.embeddings import MLPEmbedding, apply_rope, rope_frequencies, timestep_embedding
from jdpt.models.feedforward import FeedForward
from jdpt.models.layers import dense, gelu_tanh, layer_norm, rms_norm
from jdpt.models.modulation import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle

Plans = LayerPlans | AttentionPlan | None


@dataclasses.dataclass(frozen=True)
class FluxConfig(ModelConfig):
    """diffusers ``FluxTransformer2DModel`` config (defaults: FLUX.1)."""

    reference_class = "FluxTransformer2DModel"

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def validate(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                f"{self.attention_head_dim}: the rotary tables cover the whole head"
            )
        if any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"every entry of axes_dims_rope {self.axes_dims_rope} must be even")
        if self.patch_size != 1:
            raise ValueError(
                f"patch_size={self.patch_size}: Flux packs 2x2 latent patches outside the model; "
                "only patch_size=1 is used by diffusers' Flux pipelines and supported here"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


class FluxAttention(nnx.Module):
    """Self-attention with per-head RMS q/k norms and RoPE; with ``joint=True`` the text stream
    has its own projections (``add_*_proj``) and attends jointly with the image stream."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, joint: bool, layer_name: str,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.layer_name = layer_name
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.norm_q = rms_norm(head_dim, eps=1e-6, **kw)
        self.norm_k = rms_norm(head_dim, eps=1e-6, **kw)
        self.to_q = dense(dim, inner, ("embed", "heads"), **kw)
        self.to_k = dense(dim, inner, ("embed", "heads"), **kw)
        self.to_v = dense(dim, inner, ("embed", "heads"), **kw)
        self.joint = joint
        if joint:
            self.to_out = nnx.List([dense(inner, dim, ("heads", "embed"), **kw)])
            self.norm_added_q = rms_norm(head_dim, eps=1e-6, **kw)
            self.norm_added_k = rms_norm(head_dim, eps=1e-6, **kw)
            self.add_q_proj = dense(dim, inner, ("embed", "heads"), **kw)
            self.add_k_proj = dense(dim, inner, ("embed", "heads"), **kw)
            self.add_v_proj = dense(dim, inner, ("embed", "heads"), **kw)
            self.to_add_out = dense(inner, dim, ("heads", "embed"), **kw)

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.heads, self.head_dim)

    def __call__(self, x: jax.Array, context: jax.Array | None, rope: tuple[jax.Array, jax.Array],
                 plans: Plans = None):
        """x: ``[B, S, D]`` image (or, single-stream, the joint sequence); context: ``[B, L, D]``
        text for joint layers. Returns image (and text) outputs; single-stream layers return the
        un-projected attention output ``[B, S, D]``."""
        q = self.norm_q(self._heads(self.to_q(x)))
        k = self.norm_k(self._heads(self.to_k(x)))
        v = self._heads(self.to_v(x))
        if self.joint:
            cq = self.norm_added_q(self._heads(self.add_q_proj(context)))
            ck = self.norm_added_k(self._heads(self.add_k_proj(context)))
            cv = self._heads(self.add_v_proj(context))
            q = jnp.concatenate([cq, q], axis=1)
            k = jnp.concatenate([ck, k], axis=1)
            v = jnp.concatenate([cv, v], axis=1)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out, probs = attention(q, k, v, plan=resolve_plan(plans, self.layer_name))
        sow_probs(self, probs)
        out = out.reshape(*out.shape[:2], -1).astype(q.dtype)
        if not self.joint:
            return out
        n_txt = context.shape[1]
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


class FluxTransformerBlock(nnx.Module):
    """Double-stream block: text and image keep separate weights, attend jointly."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, name: str, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.norm1 = AdaLayerNormZero(dim, **kw)
        self.norm1_context = AdaLayerNormZero(dim, **kw)
        self.attn = FluxAttention(dim, heads, head_dim, joint=True, layer_name=f"{name}.attn", **kw)
        self.norm2 = layer_norm(dim, eps=1e-6, affine=False, **kw)
        self.ff = FeedForward(dim, activation_fn="gelu-approximate", **kw)
        self.norm2_context = layer_norm(dim, eps=1e-6, affine=False, **kw)
        self.ff_context = FeedForward(dim, activation_fn="gelu-approximate", **kw)

    def __call__(self, x, context, temb, rope, plans: Plans = None):
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(context, temb)
        attn_x, attn_c = self.attn(nx, nc, rope, plans)

        x = x + gate_msa[:, None] * attn_x
        h = self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp[:, None] * self.ff(h)

        context = context + c_gate_msa[:, None] * attn_c
        h = self.norm2_context(context) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        context = context + c_gate_mlp[:, None] * self.ff_context(h)
        return context, x


class FluxSingleTransformerBlock(nnx.Module):
    """Single-stream block over the joint ``[text, image]`` sequence: parallel attention + MLP."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, name: str, mlp_ratio: float = 4.0,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        hidden = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim, **kw)
        self.proj_mlp = dense(dim, hidden, ("embed", "mlp"), **kw)
        self.attn = FluxAttention(dim, heads, head_dim, joint=False, layer_name=f"{name}.attn", **kw)
        self.proj_out = dense(dim + hidden, dim, ("mlp", "embed"), **kw)

    def __call__(self, x, context, temb, rope, plans: Plans = None):
        n_txt = context.shape[1]
        joint = jnp.concatenate([context, x], axis=1)
        h, gate = self.norm(joint, temb)
        mlp = gelu_tanh(self.proj_mlp(h))
        attn = self.attn(h, None, rope, plans)
        joint = joint + gate[:, None] * self.proj_out(jnp.concatenate([attn, mlp], axis=-1))
        return joint[:, :n_txt], joint[:, n_txt:]


class CombinedTimestepEmbedding(nnx.Module):
    """diffusers ``CombinedTimestep[Guidance]TextProjEmbeddings``: time (+ guidance) + pooled text."""

    def __init__(self, dim: int, pooled_dim: int, *, guidance: bool, rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.timestep_embedder = MLPEmbedding(256, dim, **kw)
        if guidance:
            self.guidance_embedder = MLPEmbedding(256, dim, **kw)
        self.text_embedder = MLPEmbedding(pooled_dim, dim, **kw)

    def __call__(self, timestep, guidance, pooled):
        def proj(t):
            emb = timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
            return emb.astype(pooled.dtype)

        emb = self.timestep_embedder(proj(timestep))
        if guidance is not None:
            emb = emb + self.guidance_embedder(proj(guidance))
        return emb + self.text_embedder(pooled)

    def embed_unit_time(self, timestep, guidance, pooled):
        """``[B, D]`` embedding of flow timesteps in [0, 1] and guidance scales (``[B]`` or scalars,
        ``guidance`` may be None), both multiplied by 1000 as in diffusers' Flux models."""
        b = pooled.shape[0]
        # Timesteps stay fp32 in bf16 runs: t * 1000 in bf16 would be off by up to 2 steps.
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (b,)) * 1000
        if guidance is not None:
            guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (b,)) * 1000
        return self(timestep, guidance, pooled)


def build_trunk(module: nnx.Module, config, *, rngs: nnx.Rngs, param_dtype) -> None:
    """Give ``module`` the parts diffusers' ``FluxTransformer2DModel`` and ``FluxControlNetModel``
    share, under their reference names: ``time_text_embed``, ``context_embedder``,
    ``x_embedder``, ``transformer_blocks`` and ``single_transformer_blocks``."""
    dim = config.inner_dim
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    heads, head_dim = config.num_attention_heads, config.attention_head_dim
    module.time_text_embed = CombinedTimestepEmbedding(
        dim, config.pooled_projection_dim, guidance=config.guidance_embeds, **kw
    )
    module.context_embedder = dense(config.joint_attention_dim, dim, (None, "embed"), **kw)
    module.x_embedder = dense(config.in_channels, dim, (None, "embed"), **kw)
    module.transformer_blocks = nnx.List([
        FluxTransformerBlock(dim, heads, head_dim, name=f"transformer_blocks.{i}", **kw)
        for i in range(config.num_layers)
    ])
    module.single_transformer_blocks = nnx.List([
        FluxSingleTransformerBlock(dim, heads, head_dim, name=f"single_transformer_blocks.{i}", **kw)
        for i in range(config.num_single_layers)
    ])


class FluxTransformer(nnx.Module):
    """Flux MMDiT: ``num_layers`` double-stream then ``num_single_layers`` single-stream blocks."""

    config_class = FluxConfig

    def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        config.validate()
        self.config = config
        dim = config.inner_dim
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        build_trunk(self, config, **kw)
        self.norm_out = AdaLayerNormContinuous(dim, dim, eps=1e-6, affine=False, **kw)
        out_channels = config.out_channels or config.in_channels
        self.proj_out = dense(dim, config.patch_size**2 * out_channels, ("embed", None), **kw)

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        pooled_projections: jax.Array,
        timestep: jax.Array,
        img_ids: jax.Array,
        txt_ids: jax.Array,
        guidance: jax.Array | None = None,
        *,
        controlnet_block_samples: Sequence[jax.Array] | None = None,
        controlnet_single_block_samples: Sequence[jax.Array] | None = None,
        controlnet_blocks_repeat: bool = False,
        plans: Plans = None,
    ) -> jax.Array:
        """Predict the flow velocity of packed latent tokens.

        Args:
            hidden_states: ``[B, S_img, in_channels]`` packed latents.
            encoder_hidden_states: ``[B, S_txt, joint_attention_dim]`` T5 tokens.
            pooled_projections: ``[B, pooled_projection_dim]`` pooled CLIP embedding.
            timestep: ``[B]`` (or scalar) in [0, 1]; multiplied by 1000 as in diffusers.
            img_ids: ``[S_img, n_axes]``; txt_ids: ``[S_txt, n_axes]`` RoPE positions.
            guidance: ``[B]`` (or scalar) guidance scale, required iff ``guidance_embeds``.
            controlnet_block_samples / controlnet_single_block_samples: ControlNet residuals, each
                ``[B, S_img, inner_dim]`` (see ``jdpt.models.flux_controlnet``), at most one per
                block. Block ``i`` of ``N`` double (single) blocks adds sample
                ``i // ceil(N / n_samples)`` to its image output, as diffusers.
            controlnet_blocks_repeat: double block ``i`` adds sample ``i % n_samples`` instead
                (XLabs ControlNets).
            plans: attention plans by layer name (see ``jdpt.models.attention``).

        Returns:
            ``[B, S_img, patch_size**2 * out_channels]``.
        """
        cfg = self.config
        check_inputs(cfg, hidden_states, encoder_hidden_states, pooled_projections, img_ids, txt_ids, guidance)
        _check_samples("controlnet_block_samples", controlnet_block_samples, len(self.transformer_blocks),
                       (*hidden_states.shape[:2], cfg.inner_dim))
        _check_samples("controlnet_single_block_samples", controlnet_single_block_samples,
                       len(self.single_transformer_blocks), (*hidden_states.shape[:2], cfg.inner_dim))
        x = self.x_embedder(hidden_states)
        temb = self.time_text_embed.embed_unit_time(timestep, guidance, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        ids = jnp.concatenate([txt_ids, img_ids], axis=0)
        rope = rope_frequencies(ids, cfg.axes_dims_rope, theta=10000.0)

        for i, block in enumerate(self.transformer_blocks):
            context, x = block(x, context, temb, rope, plans)
            if controlnet_block_samples is not None:
                n = len(controlnet_block_samples)
                j = i % n if controlnet_blocks_repeat else i // math.ceil(len(self.transformer_blocks) / n)
                x = x + controlnet_block_samples[j]
        for i, block in enumerate(self.single_transformer_blocks):
            context, x = block(x, context, temb, rope, plans)
            if controlnet_single_block_samples is not None:
                n = len(controlnet_single_block_samples)
                x = x + controlnet_single_block_samples[i // math.ceil(len(self.single_transformer_blocks) / n)]

        return self.proj_out(self.norm_out(x, temb))


def check_inputs(cfg, x, context, pooled, img_ids, txt_ids, guidance) -> None:
    """Validate the inputs of a Flux model (transformer or ControlNet) against its config ``cfg``."""
    n_axes = len(cfg.axes_dims_rope)
    if x.ndim != 3 or x.shape[-1] != cfg.in_channels:
        raise ValueError(
            f"hidden_states must be packed latent tokens [B, S_img, in_channels={cfg.in_channels}]; "
            f"got shape {tuple(x.shape)}. Pack [B, H, W, C] latents into 2x2 patches first."
        )
    b = x.shape[0]
    if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.joint_attention_dim:
        raise ValueError(
            f"encoder_hidden_states must be [B={b}, S_txt, joint_attention_dim="
            f"{cfg.joint_attention_dim}]; got {tuple(context.shape)}"
        )
    if pooled.shape != (b, cfg.pooled_projection_dim):
        raise ValueError(
            f"pooled_projections must be [B={b}, pooled_projection_dim={cfg.pooled_projection_dim}]; "
            f"got {tuple(pooled.shape)}"
        )
    for name, ids, n in (("img_ids", img_ids, x.shape[1]), ("txt_ids", txt_ids, context.shape[1])):
        if ids.shape != (n, n_axes):
            raise ValueError(
                f"{name} must be [{n}, {n_axes}] (one row of {n_axes} RoPE positions per token, "
                f"no batch axis); got {tuple(ids.shape)}"
            )
    if cfg.guidance_embeds and guidance is None:
        raise ValueError("this Flux model embeds guidance (guidance_embeds=True): pass guidance=[B] scales")
    if not cfg.guidance_embeds and guidance is not None:
        raise ValueError(
            "this Flux model has no guidance embedding (guidance_embeds=False): pass guidance=None "
            "and use classifier-free guidance instead"
        )


def _check_samples(name: str, samples, n_blocks: int, shape: tuple[int, ...]) -> None:
    """ControlNet residuals: 1..n_blocks arrays of the image stream's shape ``[B, S_img, D]``."""
    if samples is None:
        return
    if not 1 <= len(samples) <= n_blocks:
        raise ValueError(
            f"{name} holds {len(samples)} residuals for {n_blocks} blocks; pass at least one and at "
            "most one per block (a ControlNet with no more blocks than the transformer), or None"
        )
    for i, s in enumerate(samples):
        if tuple(s.shape) != shape:
            raise ValueError(
                f"{name}[{i}] has shape {tuple(s.shape)}; residuals are added to the image tokens "
                f"and must be [B, S_img, inner_dim] = {list(shape)}: the ControlNet must share the "
                "transformer's width and get the same hidden_states"
            )


def pack_latents(latents: jax.Array) -> jax.Array:
    """``[B, H, W, C]`` latents -> ``[B, (H/2)(W/2), 4C]`` tokens of 2x2 patches, with channels
    ordered (C, dy, dx) as diffusers' ``FluxPipeline._pack_latents``."""
    b, h, w, c = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux packs 2x2 patches: latent height and width must be even; got {h}x{w}")
    x = latents.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: jax.Array, height: int, width: int) -> jax.Array:
    """Inverse of :func:`pack_latents`: ``[B, (H/2)(W/2), 4C]`` -> ``[B, H, W, C]``."""
    b, n, c4 = tokens.shape
    if n != (height // 2) * (width // 2) or c4 % 4:
        raise ValueError(f"{tuple(tokens.shape)} tokens do not unpack to a {height}x{width} latent")
    x = tokens.reshape(b, height // 2, width // 2, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, height, width, c4 // 4)


def image_ids(height: int, width: int) -> jax.Array:
    """RoPE ids ``[(H/2)(W/2), 3]`` of packed latent tokens: (0, row, column)."""
    rows, cols = jnp.meshgrid(jnp.arange(height // 2), jnp.arange(width // 2), indexing="ij")
    return jnp.stack([jnp.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3).astype(jnp.float32)

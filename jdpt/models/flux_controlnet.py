"""Flux ControlNet, a Flax NNX port of diffusers' ``FluxControlNetModel`` (InstantX / Union).

A trainable copy of the first Flux blocks reads the noisy latent tokens plus the control
condition (a packed VAE latent of the control image, ``[B, S_img, in_channels]``, entering through
the zero-initialised ``controlnet_x_embedder``). After every block a zero-initialised linear layer
turns the image stream into a residual; :class:`jdpt.models.flux.FluxTransformer` adds them to its
own image stream (``controlnet_block_samples`` / ``controlnet_single_block_samples``). At
initialisation every residual is exactly zero, so the base model's output is unchanged.

Blocks are FluxTransformer's own classes; attention layers have the same names
(``transformer_blocks.{i}.attn``, ``single_transformer_blocks.{i}.attn``). With ``num_mode`` set
(ControlNet-Union) a learned mode token is prepended to the text tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jdpt.models.config import ModelConfig
from jdpt.models.embeddings import rope_frequencies
from jdpt.models.flux import FluxConfig, FluxTransformer, Plans, build_trunk, check_inputs
from jdpt.models.layers import dense, embed


@dataclasses.dataclass(frozen=True)
class FluxControlNetConfig(ModelConfig):
    """diffusers ``FluxControlNetModel`` config (defaults: diffusers'; InstantX FLUX.1 ControlNets
    use 5 double and 10 single layers, ``from_transformer`` 4 and 10)."""

    reference_class = "FluxControlNetModel"

    patch_size: int = 1
    in_channels: int = 64
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    num_mode: int | None = None
    conditioning_embedding_channels: int | None = None

    def validate(self) -> None:
        FluxConfig.validate(self)  # the transformer's rules on patch_size and the RoPE axes
        if self.num_mode is not None and self.num_mode < 1:
            raise ValueError(f"num_mode={self.num_mode}: a ControlNet-Union needs at least one mode, "
                             "or num_mode=None for a single-condition ControlNet")
        if self.conditioning_embedding_channels is not None:
            raise ValueError(
                f"conditioning_embedding_channels={self.conditioning_embedding_channels}: the pixel-space "
                "conditioning encoder (input_hint_block) is not supported; use a ControlNet with "
                "conditioning_embedding_channels=None and pass the packed VAE latent of the control "
                "image as controlnet_cond, as diffusers' Flux ControlNet pipelines do"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def _zero_dense(in_features: int, out_features: int, **kw) -> nnx.Linear:
    """A linear layer whose weight and bias start at exactly zero (ControlNet's zero layers)."""
    layer = dense(in_features, out_features, (None, "embed"), **kw)
    layer.kernel.set_value(jnp.zeros_like(layer.kernel.get_value()))
    return layer


class FluxControlNetModel(nnx.Module):
    """``num_layers`` double- and ``num_single_layers`` single-stream Flux blocks, each followed by
    a zero-initialised linear layer producing a residual for the transformer."""

    config_class = FluxControlNetConfig

    def __init__(self, config: FluxControlNetConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        config.validate()
        self.config = config
        dim = config.inner_dim
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        build_trunk(self, config, **kw)
        self.controlnet_blocks = nnx.List([_zero_dense(dim, dim, **kw) for _ in range(config.num_layers)])
        self.controlnet_single_blocks = nnx.List(
            [_zero_dense(dim, dim, **kw) for _ in range(config.num_single_layers)]
        )
        if config.num_mode is not None:
            self.controlnet_mode_embedder = embed(config.num_mode, dim, axes=(None, "embed"), **kw)
        self.controlnet_x_embedder = _zero_dense(config.in_channels, dim, **kw)

    @classmethod
    def from_transformer(
        cls,
        transformer: FluxTransformer,
        *,
        num_layers: int = 4,
        num_single_layers: int = 10,
        attention_head_dim: int | None = None,
        num_attention_heads: int | None = None,
        load_weights_from_transformer: bool = True,
        rngs: nnx.Rngs,
    ) -> FluxControlNetModel:
        """A ControlNet for ``transformer`` (diffusers ``FluxControlNetModel.from_transformer``).

        The config is the transformer's with ``num_layers`` / ``num_single_layers`` blocks (and the
        given attention shape; None keeps the transformer's). With ``load_weights_from_transformer``
        the time/text/context/x embedders and the first blocks are copies of the transformer's
        (blocks beyond the transformer's count stay random); the zero layers and
        ``controlnet_x_embedder`` start at zero either way. Parameters take the transformer's dtype.
        """
        base = transformer.config
        heads = base.num_attention_heads if num_attention_heads is None else num_attention_heads
        head_dim = base.attention_head_dim if attention_head_dim is None else attention_head_dim
        if load_weights_from_transformer and (heads, head_dim) != (base.num_attention_heads,
                                                                   base.attention_head_dim):
            raise ValueError(
                f"num_attention_heads={heads}, attention_head_dim={head_dim} differ from the "
                f"transformer's {base.num_attention_heads} x {base.attention_head_dim}: its weights "
                "cannot be copied. Keep the transformer's attention shape (None), or pass "
                "load_weights_from_transformer=False"
            )
        shared = {f.name: getattr(base, f.name) for f in dataclasses.fields(FluxControlNetConfig)
                  if hasattr(base, f.name)}
        config = FluxControlNetConfig(**{**shared, "num_layers": num_layers,
                                         "num_single_layers": num_single_layers,
                                         "num_attention_heads": heads, "attention_head_dim": head_dim})
        dtype = transformer.x_embedder.kernel.get_value().dtype
        controlnet = cls(config, rngs=rngs, param_dtype=dtype)
        if load_weights_from_transformer:
            pairs = [(controlnet.time_text_embed, transformer.time_text_embed),
                     (controlnet.context_embedder, transformer.context_embedder),
                     (controlnet.x_embedder, transformer.x_embedder),
                     *zip(controlnet.transformer_blocks, transformer.transformer_blocks),
                     *zip(controlnet.single_transformer_blocks, transformer.single_transformer_blocks)]
            for ours, theirs in pairs:
                nnx.update(ours, nnx.state(theirs, nnx.Param))
        return controlnet

    def __call__(
        self,
        hidden_states: jax.Array,
        controlnet_cond: jax.Array,
        encoder_hidden_states: jax.Array,
        pooled_projections: jax.Array,
        timestep: jax.Array,
        img_ids: jax.Array,
        txt_ids: jax.Array,
        *,
        guidance: jax.Array | None = None,
        conditioning_scale: float | jax.Array = 1.0,
        controlnet_mode: jax.Array | None = None,
        plans: Plans = None,
    ) -> tuple[tuple[jax.Array, ...] | None, tuple[jax.Array, ...] | None]:
        """Residuals for a :class:`~jdpt.models.flux.FluxTransformer` given the same inputs.

        Args:
            hidden_states: ``[B, S_img, in_channels]`` packed noisy latents (the transformer's).
            controlnet_cond: ``[B, S_img, in_channels]`` packed latent of the control image.
            encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance: as
                :meth:`FluxTransformer.__call__` (timesteps in [0, 1]).
            conditioning_scale: multiplies every residual (scalar).
            controlnet_mode: ``[B]`` or ``[B, 1]`` integer control type, required iff ``num_mode``
                (ControlNet-Union).
            plans: attention plans by layer name.

        Returns:
            ``(block_samples, single_block_samples)``: tuples of ``[B, S_img, inner_dim]``
            residuals, one per double / single block (None where there are no such blocks).
        """
        cfg = self.config
        check_inputs(cfg, hidden_states, encoder_hidden_states, pooled_projections, img_ids, txt_ids, guidance)
        if controlnet_cond.shape != hidden_states.shape:
            raise ValueError(
                f"controlnet_cond has shape {tuple(controlnet_cond.shape)}; it must match hidden_states "
                f"{tuple(hidden_states.shape)}: pack the control image's VAE latent like the noisy latents"
            )
        b = hidden_states.shape[0]
        x = self.x_embedder(hidden_states) + self.controlnet_x_embedder(controlnet_cond)
        temb = self.time_text_embed.embed_unit_time(timestep, guidance, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        if cfg.num_mode is not None:
            if controlnet_mode is None or jnp.shape(controlnet_mode) not in ((b,), (b, 1)):
                raise ValueError(
                    f"this ControlNet-Union (num_mode={cfg.num_mode}) needs controlnet_mode: [B] or "
                    f"[B, 1] integer control types in [0, {cfg.num_mode}) with B={b}; got "
                    f"{None if controlnet_mode is None else jnp.shape(controlnet_mode)}"
                )
            mode = self.controlnet_mode_embedder(jnp.reshape(controlnet_mode, (b, 1)))
            context = jnp.concatenate([mode.astype(context.dtype), context], axis=1)
            txt_ids = jnp.concatenate([txt_ids[:1], txt_ids], axis=0)  # the mode token's position
        elif controlnet_mode is not None:
            raise ValueError("this ControlNet has no mode embedding (num_mode=None): pass controlnet_mode=None")
        rope = rope_frequencies(jnp.concatenate([txt_ids, img_ids], axis=0), cfg.axes_dims_rope, theta=10000.0)

        double, single = [], []
        for block, zero in zip(self.transformer_blocks, self.controlnet_blocks):
            context, x = block(x, context, temb, rope, plans)
            double.append(zero(x) * conditioning_scale)
        for block, zero in zip(self.single_transformer_blocks, self.controlnet_single_blocks):
            context, x = block(x, context, temb, rope, plans)
            single.append(zero(x) * conditioning_scale)
        return tuple(double) or None, tuple(single) or None
